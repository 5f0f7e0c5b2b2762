//! A throwaway three-node RabbitMQ cluster on ports of its own (`port`,
//! `port + 10`, `port + 20` for AMQP; see [`ScratchRabbit`] for the others), for
//! tests that kill the node a connection is on, or the whole cluster. Nodes are
//! killed on drop and their directories removed.

use super::scratch::ScratchRabbit;
use std::time::{Duration, Instant};

/// Longest wait for a node to boot (or to re-join its cluster).
const BOOT: Duration = Duration::from_secs(120);

pub struct ScratchCluster {
    pub nodes: Vec<ScratchRabbit>,
}

impl ScratchCluster {
    /// Starts `{name}1..3@localhost` and joins the second and third to the first.
    pub async fn start(name: &str, port: u16) -> ScratchCluster {
        let nodes: Vec<ScratchRabbit> = (0..3u16)
            .map(|i| {
                let port = port + 10 * i;
                let conf = format!(
                    "listeners.tcp.default = 127.0.0.1:{port}\n\
                     loopback_users = none\n\
                     cluster_partition_handling = pause_minority\n"
                );
                ScratchRabbit::start(&format!("{name}{}", i + 1), port, &conf, "[].\n")
            })
            .collect();
        let mut cluster = ScratchCluster { nodes };
        cluster.await_startup(&[0, 1, 2]).await;
        for i in 1..3 {
            let join = || -> Result<(), String> {
                let node = &cluster.nodes[i];
                node.ctl(&["stop_app"])?;
                node.ctl(&["join_cluster", &cluster.nodes[0].node])?;
                node.ctl(&["start_app"])?;
                Ok(())
            };
            join().unwrap_or_else(|e| panic!("joining the cluster: {e}"));
        }
        cluster.await_startup(&[0, 1, 2]).await;
        let status = cluster.nodes[0].ctl(&["cluster_status"]).unwrap();
        for n in &cluster.nodes {
            assert!(
                status.contains(&n.node),
                "{} not in the cluster: {status}",
                n.node
            );
        }
        cluster
    }

    /// Node `i`'s AMQP URL (guest over loopback).
    pub fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[i].port)
    }

    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// `amqp.url` as a TOML array of every node.
    pub fn toml_urls(&self) -> String {
        let quoted: Vec<String> = self.urls().iter().map(|u| format!("\"{u}\"")).collect();
        format!("url = [{}]", quoted.join(", "))
    }

    /// Which node `host:port` (as `/readyz` and the logs name it) is.
    pub fn index_of(&self, node: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| node == format!("127.0.0.1:{}", n.port))
            .unwrap_or_else(|| panic!("{node} is not a node of this cluster"))
    }

    /// The queues, consumers and connections as the first node that answers
    /// sees them (for a failure message).
    pub fn describe(&self) -> String {
        let ask = [
            vec![
                "list_queues",
                "name",
                "type",
                "leader",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ],
            vec![
                "list_consumers",
                "queue_name",
                "channel_pid",
                "prefetch_count",
                "active",
            ],
            vec!["list_connections", "name", "peer_port", "state", "channels"],
        ];
        for node in &self.nodes {
            let answers: Result<Vec<String>, String> = ask.iter().map(|a| node.ctl(a)).collect();
            if let Ok(a) = answers {
                return format!("as {} sees it:\n{}", node.node, a.join("\n"));
            }
        }
        "no node answered rabbitmqctl".to_string()
    }

    /// kill -9 of node `i`.
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9();
    }

    /// Starts nodes `which` again, all at once (after the whole cluster went
    /// down, each waits for the others), and waits until they run.
    pub async fn restart(&mut self, which: &[usize]) {
        for &i in which {
            self.nodes[i].restart();
        }
        self.await_startup(which).await;
    }

    /// Waits until nodes `which` have booted (their apps running).
    async fn await_startup(&mut self, which: &[usize]) {
        let deadline = Instant::now() + BOOT;
        for &i in which {
            let node = &mut self.nodes[i];
            loop {
                if let Some(log) = node.exited() {
                    panic!("{} exited while starting:\n{log}", node.node);
                }
                let timeout = deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs()
                    .max(1);
                let result = tokio::task::block_in_place(|| {
                    node.ctl(&["await_startup", "--timeout", &timeout.to_string()])
                });
                match result {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        panic!("{} did not start within {BOOT:?}: {e}", node.node)
                    }
                    // The node's distribution port may not be open yet.
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
    }
}
