//! `[postgres] shards` and `shard`: the outbox split over several relays, one
//! publication and one slot per shard, each row in exactly one shard by a hash
//! of its aggregate id (so an aggregate keeps its order within its shard).

use super::{Config, ConfigError};

/// The most shards one outbox may be split into.
pub const MAX_SHARDS: u32 = 64;

/// How the outbox is split over relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharding {
    /// Shards in all (1: not sharded).
    pub count: u32,
    /// The shard this process runs (`postgres.shard`, `--shard`), when named.
    pub index: Option<u32>,
    /// `postgres.slot` and `postgres.publication` as configured; shard `i`'s
    /// are `{slot}_{i}` and `{publication}_{i}`.
    pub base_slot: String,
    pub base_publication: String,
}

impl Sharding {
    /// Not sharded: the configured names as they are.
    pub fn single(slot: &str, publication: &str) -> Sharding {
        Sharding {
            count: 1,
            index: None,
            base_slot: slot.to_string(),
            base_publication: publication.to_string(),
        }
    }

    pub fn is_sharded(&self) -> bool {
        self.count > 1
    }

    /// Shard `i`'s slot.
    pub fn slot(&self, i: u32) -> String {
        match self.is_sharded() {
            true => format!("{}_{i}", self.base_slot),
            false => self.base_slot.clone(),
        }
    }

    /// Shard `i`'s publication.
    pub fn publication(&self, i: u32) -> String {
        match self.is_sharded() {
            true => format!("{}_{i}", self.base_publication),
            false => self.base_publication.clone(),
        }
    }

    /// "shard 1 of 3" (empty when not sharded), for messages.
    pub fn label(&self) -> String {
        match (self.is_sharded(), self.index) {
            (true, Some(i)) => format!("shard {i} of {}", self.count),
            (true, None) => format!("{} shards", self.count),
            (false, _) => String::new(),
        }
    }
}

impl Config {
    /// This configuration for shard `i` (its slot and publication), as
    /// `run --shard I` uses it.
    pub fn for_shard(&self, i: u32) -> Result<Config, ConfigError> {
        let s = &self.postgres.sharding;
        if i >= s.count {
            return Err(ConfigError::Invalid {
                key: "postgres.shard".into(),
                message: format!(
                    "is {i}, but postgres.shards = {}: shards are numbered 0 to {}",
                    s.count,
                    s.count - 1
                ),
            });
        }
        let mut config = self.clone();
        let pg = &mut config.postgres;
        pg.sharding.index = Some(i);
        pg.slot = pg.sharding.slot(i);
        pg.publication = pg.sharding.publication(i);
        Ok(config)
    }

    /// `--shards N` of `init`: this configuration split into `count` shards.
    pub fn with_shards(&self, count: u32) -> Result<Config, ConfigError> {
        check_count(count)?;
        let mut config = self.clone();
        let s = &mut config.postgres.sharding;
        s.count = count;
        s.index = None;
        config.postgres.slot = s.base_slot.clone();
        config.postgres.publication = s.base_publication.clone();
        Ok(config)
    }

    /// The shards a command that can show several looks at: the one named, else
    /// every one.
    pub fn selected_shards(&self) -> Vec<Config> {
        match self.postgres.sharding.index {
            Some(_) => vec![self.clone()],
            None => self.each_shard(),
        }
    }

    /// One configuration per shard (the configuration itself when not sharded).
    pub fn each_shard(&self) -> Vec<Config> {
        let s = &self.postgres.sharding;
        match s.is_sharded() {
            true => (0..s.count)
                .map(|i| self.for_shard(i).expect("i < count"))
                .collect(),
            false => vec![self.clone()],
        }
    }
}

/// `postgres.shards` is 1 to [`MAX_SHARDS`].
pub(super) fn check_count(count: u32) -> Result<(), ConfigError> {
    if (1..=MAX_SHARDS).contains(&count) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key: "postgres.shards".into(),
        message: format!("is {count}: give 1 (not sharded) to {MAX_SHARDS}"),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(text: &str) -> Result<Config, String> {
        Config::from_toml_with_env(text, "test.toml", Vec::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn each_shard_has_its_own_slot_and_publication() {
        let c = load("[postgres]\nslot = \"orders\"\npublication = \"orders_pub\"\nshards = 3\n")
            .unwrap();
        let names: Vec<(String, String)> = c
            .each_shard()
            .iter()
            .map(|s| (s.postgres.slot.clone(), s.postgres.publication.clone()))
            .collect();
        assert_eq!(
            names,
            [
                ("orders_0".into(), "orders_pub_0".into()),
                ("orders_1".into(), "orders_pub_1".into()),
                ("orders_2".into(), "orders_pub_2".into())
            ]
        );
        let one = load("[postgres]\nslot = \"orders\"\nshards = 3\nshard = 2\n").unwrap();
        assert_eq!(one.postgres.slot, "orders_2");
        assert_eq!(one.postgres.sharding.label(), "shard 2 of 3");
        let plain = load("[postgres]\nslot = \"orders\"\n").unwrap();
        assert_eq!(plain.each_shard().len(), 1);
        assert_eq!(plain.postgres.slot, "orders");
    }

    #[test]
    fn shard_numbers_are_checked_and_name_the_key() {
        for (text, key) in [
            ("[postgres]\nshards = 0\n", "postgres.shards"),
            ("[postgres]\nshards = 65\n", "postgres.shards"),
            ("[postgres]\nshards = 3\nshard = 3\n", "postgres.shard"),
            ("[postgres]\nshard = 1\n", "postgres.shard"),
        ] {
            let e = load(text).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        }
        let c = load("[postgres]\nshards = 2\n").unwrap();
        assert!(c.for_shard(2).unwrap_err().to_string().contains("0 to 1"));
        // The longest slot name (with its suffix) must still be a valid one.
        let long = "s".repeat(62);
        let e = load(&format!("[postgres]\nslot = \"{long}\"\nshards = 10\n")).unwrap_err();
        assert!(e.contains("postgres.slot"), "{e}");
    }
}
