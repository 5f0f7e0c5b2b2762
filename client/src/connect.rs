//! How the [`crate::Processor`] opens its sessions: a [`Connect`] gives a
//! client and a wake-up for each notification. Any tokio-postgres TLS connector
//! makes one ([`Connect::tls`]); a plain connection is [`Connect::plain`].

use crate::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, Connection, Socket};

/// An open session: the client, and a wake-up per notification it receives
/// (the channel closes when the connection ends).
pub struct Session {
    pub client: Client,
    pub notifications: mpsc::Receiver<()>,
}

/// The future a [`Connect`] returns.
pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = Result<Session, Error>> + Send + 'a>>;

/// Opens sessions named `application_name` (shown in `pg_stat_activity`).
pub trait Connect: Send + Sync + 'static {
    fn connect<'a>(&'a self, application_name: &'a str) -> ConnectFuture<'a>;
}

impl dyn Connect {
    /// Plain connections to `url` (a URL or `key=value` string).
    pub fn plain(url: &str) -> Result<Arc<dyn Connect>, Error> {
        Self::tls(url, tokio_postgres::NoTls)
    }

    /// Connections to `url` through `tls` (any tokio-postgres TLS connector;
    /// `sslmode` in the URL says when it is used).
    pub fn tls<T>(url: &str, tls: T) -> Result<Arc<dyn Connect>, Error>
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::Invalid(format!("the database URL cannot be parsed: {e}")))?;
        Ok(Arc::new(WithTls { config, tls }))
    }
}

struct WithTls<T> {
    config: tokio_postgres::Config,
    tls: T,
}

impl<T> Connect for WithTls<T>
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    fn connect<'a>(&'a self, application_name: &'a str) -> ConnectFuture<'a> {
        Box::pin(async move {
            let mut config = self.config.clone();
            config.application_name(application_name);
            let (client, connection) = config
                .connect(self.tls.clone())
                .await
                .map_err(|e| Error::Connect(crate::error::server_message(&e)))?;
            Ok(Session {
                client,
                notifications: drive(connection),
            })
        })
    }
}

/// Drives `connection` on a task of its own; each notification it receives
/// wakes the returned channel, which closes when the connection ends.
pub fn drive<S, T>(connection: Connection<S, T>) -> mpsc::Receiver<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::StreamExt;
    let (wake, woken) = mpsc::channel(1);
    let mut connection = connection;
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                // A wake-up is a hint: one pending is enough.
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = wake.try_send(());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "postgres session ended");
                    break;
                }
            }
        }
    });
    woken
}
