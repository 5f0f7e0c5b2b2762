//! TLS fixtures: a CA with server and client certificates made here (rcgen),
//! a scratch Postgres cluster with `ssl = on` and a scratch RabbitMQ node with a
//! TLS listener, on ports of their own. Used by the security tests and by the
//! live latency benchmark (`benches/live.rs`, which includes this file).

use super::scratch::{self, ScratchPg, ScratchRabbit};
use std::path::{Path, PathBuf};

/// The scratch Postgres' password and the scratch RabbitMQ user's: markers
/// that must never show in anything the relay writes.
pub const PG_MARKER: &str = "SecMarkerPg-93b1e7";
pub const MQ_MARKER: &str = "SecMarkerMq-93b1e7";

/// CA, server and client certificates in PEM files under `dir`.
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn make(dir: &Path) -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        std::fs::create_dir_all(dir).unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        let ca = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let key = KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("sec test ca");
        write("ca.pem", ca_cert.pem());
        let (other_ca, _) = ca("sec some other ca");
        write("wrong-ca.pem", other_ca.pem());
        let leaf = |name: &str, cn: &str, sans: Vec<String>| {
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        };
        leaf("server", "localhost", vec!["localhost".into()]);
        leaf(
            "server-other",
            "other.invalid",
            vec!["other.invalid".into()],
        );
        leaf("client", "postgres", vec![]);
        leaf("mq-client", "sec_user", vec![]);
        Certs {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// A throwaway Postgres cluster: `ssl = on`, `wal_level = logical`, SCRAM over
/// TLS and clear-text passwords without it (to prove the relay refuses those).
pub fn tls_pg(port: u16, certs: &Certs) -> ScratchPg {
    let files: Vec<(String, &str)> = [
        "ca.pem",
        "server.pem",
        "server.key",
        "server-other.pem",
        "server-other.key",
    ]
    .into_iter()
    .map(|f| (certs.path(f), f))
    .collect();
    let pg = ScratchPg::start(scratch::Setup {
        name: "sec-pg",
        port,
        conf: "ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.pem'",
        hba: "local all all trust\n\
              hostssl all all 127.0.0.1/32 scram-sha-256\n\
              hostssl all all ::1/128 scram-sha-256\n\
              hostnossl all all 127.0.0.1/32 password\n\
              hostnossl all all ::1/128 password\n",
        auth_host: "scram-sha-256",
        files: &files,
    });
    pg.psql(&format!("alter user postgres password '{PG_MARKER}'"));
    pg
}

/// A throwaway RabbitMQ node with only a TLS listener (the management plugin
/// off). `external`: also log in by client certificate (EXTERNAL, by common
/// name). `plain_too`: also a plain listener on `port + 3` (for the TLS cost
/// measurement).
pub fn tls_rabbit(port: u16, certs: &Certs, external: bool) -> ScratchRabbit {
    tls_rabbit_with(port, certs, external, false)
}

pub fn tls_rabbit_with(port: u16, certs: &Certs, external: bool, plain_too: bool) -> ScratchRabbit {
    let conf = format!(
        "{tcp}\n\
         listeners.ssl.default = {port}\n\
         ssl_options.cacertfile = {ca}\n\
         ssl_options.certfile = {cert}\n\
         ssl_options.keyfile = {key}\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = false\n\
         loopback_users = none\n\
         default_user = sec_user\n\
         default_pass = {MQ_MARKER}\n{extra}",
        tcp = if plain_too {
            format!("listeners.tcp.default = 127.0.0.1:{}", port + 3)
        } else {
            "listeners.tcp = none".to_string()
        },
        extra = if external {
            "auth_mechanisms.1 = PLAIN\nauth_mechanisms.2 = EXTERNAL\nssl_cert_login_from = common_name\n"
        } else {
            ""
        },
        ca = certs.path("ca.pem"),
        cert = certs.path("server.pem"),
        key = certs.path("server.key"),
    );
    let plugins = if external {
        "[rabbitmq_auth_mechanism_ssl].\n"
    } else {
        "[].\n"
    };
    ScratchRabbit::start(&format!("sec_rabbit_{port}"), port, &conf, plugins)
}
