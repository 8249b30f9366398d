//! A TCP proxy a test can cut: what a network partition looks like to the
//! two ends of a connection (bytes stop flowing, nobody is told), and what
//! a reset looks like (every connection through it dies at once).
//!
//! It runs on a thread and runtime of its own, so a test that blocks (on a
//! child process, say) never stalls the traffic it forwards.

use std::{net::SocketAddr, thread::JoinHandle};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// The most connections the proxy carries at once; more are refused.
const MAX_CONNECTIONS: usize = 64;
/// The largest chunk forwarded at once.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link {
    /// Bytes flow (false: a partition).
    open: bool,
    /// Bumped by a reset: connections of an older generation die.
    generation: u64,
    /// The proxy is being dropped.
    closed: bool,
}

/// A proxy from its own 127.0.0.1 port to `upstream`.
pub struct CutProxy {
    /// Where clients connect instead of the upstream.
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    thread: Option<JoinHandle<()>>,
}

impl CutProxy {
    /// Starts forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy's port");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("the proxy's address");
        let (link, watching) = watch::channel(Link {
            open: true,
            generation: 0,
            closed: false,
        });
        let thread = std::thread::Builder::new()
            .name("cut-proxy".into())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the proxy's runtime")
                    .block_on(serve(std_listener, upstream, watching));
            })
            .expect("spawn the proxy's thread");
        Self {
            addr,
            link,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A partition: no byte goes through in either direction until
    /// [`CutProxy::heal`] (bytes already read are held, not lost), and new
    /// connections are accepted but not connected onward.
    pub fn partition(&self) {
        self.link.send_modify(|l| l.open = false);
    }

    /// Ends a partition: held bytes flow on.
    pub fn heal(&self) {
        self.link.send_modify(|l| l.open = true);
    }

    /// Drops every connection through the proxy at once (both ends see
    /// them close); new ones work as before.
    pub fn reset(&self) {
        self.link.send_modify(|l| l.generation += 1);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.link.send_modify(|l| l.closed = true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(listener: std::net::TcpListener, upstream: SocketAddr, link: watch::Receiver<Link>) {
    let listener = TcpListener::from_std(listener).expect("the proxy's listener");
    let connections = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut closing = link.clone();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let Ok(permit) = std::sync::Arc::clone(&connections).try_acquire_owned() else {
                    continue;
                };
                let link = link.clone();
                tasks.spawn(async move {
                    carry(client, upstream, link).await;
                    drop(permit);
                });
            }
            changed = closing.wait_for(|l| l.closed) => {
                let _ = changed;
                break;
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

/// Carries one connection until either side closes it, or a reset.
async fn carry(client: TcpStream, upstream: SocketAddr, mut link: watch::Receiver<Link>) {
    let generation = link.borrow().generation;
    let dead = |l: &Link| l.closed || l.generation != generation;
    // A partition holds new connections too.
    if link.wait_for(|l| l.open || dead(l)).await.is_err() || dead(&link.borrow()) {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut ended = link.clone();
    tokio::select! {
        () = pump(client_read, server_write, link.clone(), generation) => {}
        () = pump(server_read, client_write, link, generation) => {}
        _ = ended.wait_for(|l| l.closed || l.generation != generation) => {}
    }
}

/// Copies one direction, holding each chunk while the link is partitioned.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
    generation: u64,
) {
    let mut buffer = vec![0; CHUNK];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match link
            .wait_for(|l| l.open || l.closed || l.generation != generation)
            .await
        {
            Ok(l) if l.open && !l.closed && l.generation == generation => {}
            _ => return,
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(stream: &mut TcpStream, byte: u8) -> std::io::Result<u8> {
        stream.write_all(&[byte]).await?;
        let mut back = [0];
        stream.read_exact(&mut back).await?;
        Ok(back[0])
    }

    #[tokio::test]
    async fn a_partition_holds_bytes_until_healed_and_a_reset_kills_connections() {
        let proxy = CutProxy::start(echo_server().await);
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(roundtrip(&mut stream, 1).await.unwrap(), 1);

        proxy.partition();
        stream.write_all(&[2]).await.unwrap();
        let mut back = [0];
        let held = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            stream.read_exact(&mut back),
        )
        .await;
        assert!(held.is_err(), "a byte crossed the partition");
        proxy.heal();
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back[0], 2, "the held byte arrives after the heal");

        proxy.reset();
        let mut rest = Vec::new();
        let read = stream.read_to_end(&mut rest).await;
        assert!(
            read.is_err() || rest.is_empty(),
            "the connection survived a reset"
        );
        let mut again = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(roundtrip(&mut again, 3).await.unwrap(), 3);
    }
}
