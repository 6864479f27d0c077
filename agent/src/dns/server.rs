//! One network's resolver: UDP and TCP port 53 on the network's gateway address, and the loop
//! that moves bytes between them, the upstreams and the sans-IO `resolver` (answers,
//! forwarding, its timers).
//!
//! The UDP path allocates nothing and takes no lock per query: the query and reply buffers,
//! the forwarder's slots and the name table are the task's own (a new table arrives between
//! wakeups), and the counters are copied out once per wakeup. TCP is the slow path: each connection is a task of its own that reads one
//! length-prefixed query at a time, hands it (in a buffer it keeps for the connection) to
//! the network's task and writes back the reply it gets in the same buffer; a TCP client's
//! forwarded query goes to the upstream over TCP too, in a task per try.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use resolver::answer::DEFAULT_MAX_UDP_PAYLOAD;
use resolver::{Counters, Forwarder, ForwarderConfig, Outcome, Resolver, ResolverConfig, Transmit, Transport};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};

use super::{Names, NetworkState, UpstreamsState};

/// The DNS port.
pub const PORT: u16 = 53;
/// Datagrams read from one socket per wakeup, at most: a flood on the client socket cannot
/// starve the upstream replies, the timers or a new name table.
pub const BATCH: usize = 64;
/// TCP connections open at once, at most; more are closed at once (counted `tcp_busy`).
pub const MAX_TCP: usize = 64;
/// A TCP connection that sends nothing for this long is closed (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How long a TCP connection waits for its reply: longer than the forwarder gives a query in
/// all, so a reply (or SERVFAIL) always comes first.
const TCP_REPLY_WAIT: Duration = Duration::from_secs(7);
/// How long a network whose sockets cannot be bound waits before it tries again.
const RETRY_BIND: Duration = Duration::from_secs(2);
/// The largest DNS message (and UDP payload).
const MAX_MESSAGE: usize = 65_535;

/// What the shell itself counts (the resolver counts the rest).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShellCounters {
    /// Replies (or forwarded queries) the socket would not take (its buffer full): dropped.
    pub send_failed: u64,
    /// TCP connections accepted.
    pub tcp_connections: u64,
    /// TCP connections closed at once: [`MAX_TCP`] were open.
    pub tcp_refused: u64,
    /// TCP messages of length 0: the connection is closed.
    pub tcp_malformed: u64,
}

/// Which network, where, and the TTL of its answers.
pub struct Config {
    pub network: String,
    pub gateway: Ipv4Addr,
    pub ttl: u32,
}

/// What the supervisor sends a server.
pub struct Inputs {
    pub names: watch::Receiver<Arc<Names>>,
    pub upstreams: watch::Receiver<Arc<UpstreamsState>>,
}

/// How the forwarder names a client: its address, or its TCP connection's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Udp(SocketAddr),
    Tcp(usize),
}

/// A query a TCP connection read, in the connection's buffer, and where the reply goes (in
/// the same buffer; empty: close the connection).
struct TcpQuery {
    buf: Vec<u8>,
    reply: mpsc::Sender<Vec<u8>>,
    /// The client's address.
    client: IpAddr,
}

/// The sockets of a network's resolver.
struct Sockets {
    udp: UdpSocket,
    tcp: TcpListener,
    /// Where forwarded queries leave from (IPv4 upstreams; IPv6 ones if the host has IPv6).
    up4: UdpSocket,
    up6: Option<UdpSocket>,
}

impl Sockets {
    async fn bind(gateway: Ipv4Addr) -> std::io::Result<Sockets> {
        let at = SocketAddr::V4(SocketAddrV4::new(gateway, PORT));
        let udp = UdpSocket::bind(at).await?;
        let tcp = TcpListener::bind(at).await?;
        let up4 = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await?;
        let up6 = UdpSocket::bind(SocketAddr::from(([0u16; 8], 0))).await.ok();
        Ok(Sockets { udp, tcp, up4, up6 })
    }
}

/// Serves `config.network` until aborted: binds (retrying while it cannot), then answers.
pub async fn run(config: Config, inputs: Inputs, state: Arc<Mutex<NetworkState>>) {
    let publish = |f: &mut dyn FnMut(&mut NetworkState)| f(&mut state.lock().unwrap_or_else(|p| p.into_inner()));
    let sockets = loop {
        match Sockets::bind(config.gateway).await {
            Ok(s) => break s,
            Err(e) => {
                let why = format!("cannot listen on {}:{PORT}: {e}", config.gateway);
                let mut first = false;
                publish(&mut |s| {
                    first = s.error.as_deref() != Some(why.as_str());
                    s.listening = false;
                    s.error = Some(why.clone());
                });
                if first {
                    tracing::warn!(network = %config.network, error = %why, "DNS resolver not listening; retrying");
                }
                tokio::time::sleep(RETRY_BIND).await;
            }
        }
    };
    publish(&mut |s| {
        s.listening = true;
        s.error = None;
    });
    tracing::info!(network = %config.network, addr = %config.gateway, "DNS resolver listening (UDP and TCP 53)");
    let (tcp_tx, tcp_rx) = mpsc::channel(MAX_TCP);
    let (up_tx, up_rx) = mpsc::channel(MAX_TCP);
    let upstreams = inputs.upstreams.borrow().upstreams.clone();
    let mut server = Server {
        network: config.network,
        resolver: Resolver::new(ResolverConfig { ttl: config.ttl, max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD }),
        names: Arc::clone(&inputs.names.borrow()),
        fwd: Forwarder::new(upstreams, ForwarderConfig::default(), StdRng::from_entropy()),
        counters: Counters::default(),
        shell: ShellCounters::default(),
        rng: StdRng::from_entropy(),
        query: vec![0; MAX_MESSAGE].into_boxed_slice(),
        out: vec![0; MAX_MESSAGE].into_boxed_slice(),
        tcp_slots: (0..MAX_TCP).map(|_| None).collect(),
        tcp_free: (0..MAX_TCP).rev().collect(),
        tcp_open: Arc::new(AtomicUsize::new(0)),
        tcp_tx,
        up_tx,
    };
    {
        // Counters survive a network's going down and up again on this host.
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        server.counters = s.counters.clone();
        server.shell = s.shell;
    }
    server.serve(sockets, inputs, tcp_rx, up_rx, &state).await;
}

struct Server {
    network: String,
    resolver: Resolver,
    names: Arc<Names>,
    fwd: Forwarder<Client, StdRng>,
    counters: Counters,
    shell: ShellCounters,
    rng: StdRng,
    /// A client's query (or an upstream's reply) as read.
    query: Box<[u8]>,
    /// What is sent next.
    out: Box<[u8]>,
    /// TCP queries waiting for an upstream, by slot.
    tcp_slots: Vec<Option<TcpQuery>>,
    tcp_free: Vec<usize>,
    tcp_open: Arc<AtomicUsize>,
    tcp_tx: mpsc::Sender<TcpQuery>,
    /// Replies of upstreams asked over TCP.
    up_tx: mpsc::Sender<(SocketAddr, Vec<u8>)>,
}

impl Server {
    async fn serve(
        &mut self,
        io: Sockets,
        mut inputs: Inputs,
        mut tcp_rx: mpsc::Receiver<TcpQuery>,
        mut up_rx: mpsc::Receiver<(SocketAddr, Vec<u8>)>,
        state: &Mutex<NetworkState>,
    ) {
        let mut timer = Box::pin(tokio::time::sleep(Duration::from_secs(3600)));
        let mut armed: Option<Instant> = None;
        // What `state` holds, to compare with without its lock.
        let mut published = (self.counters.clone(), self.shell);
        loop {
            tokio::select! {
                r = io.udp.readable() => if r.is_ok() { self.on_client_datagrams(&io) },
                r = io.up4.readable() => if r.is_ok() { self.on_upstream_datagrams(&io.up4, &io) },
                r = async { io.up6.as_ref()?.readable().await.ok() }, if io.up6.is_some() => if r.is_some()
                    && let Some(up6) = &io.up6 { self.on_upstream_datagrams(up6, &io) },
                r = io.tcp.accept() => if let Ok((stream, _)) = r { self.on_connection(stream) },
                Some(q) = tcp_rx.recv() => self.on_tcp_query(q, &io),
                Some((from, reply)) = up_rx.recv() => {
                    if let Some(t) = self.fwd.handle_reply(from, &reply, Instant::now(), &mut self.out, &mut self.counters) {
                        self.transmit(t, &io);
                    }
                }
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    while let Some(t) = self.fwd.handle_timeout(Instant::now(), &mut self.out, &mut self.counters) {
                        self.transmit(t, &io);
                    }
                }
                r = inputs.names.changed() => match r {
                    Ok(()) => self.names = Arc::clone(&inputs.names.borrow_and_update()),
                    Err(_) => return,
                },
                r = inputs.upstreams.changed() => match r {
                    Ok(()) => {
                        let u = inputs.upstreams.borrow_and_update().upstreams.clone();
                        self.fwd.set_upstreams(u);
                    }
                    Err(_) => return,
                },
            }
            // Copied out once per wakeup (up to a batch of queries), not per query: the
            // counters of `overlayd dns` and the metrics are never behind.
            if self.counters != published.0 || self.shell != published.1 {
                published.0.clone_from(&self.counters);
                published.1 = self.shell;
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                s.counters.clone_from(&self.counters);
                s.shell = self.shell;
            }
            let next = self.fwd.poll_timeout();
            if next != armed {
                armed = next;
                if let Some(at) = next {
                    timer.as_mut().reset(tokio::time::Instant::from_std(at));
                }
            }
        }
    }

    /// Up to [`BATCH`] queries from the network's containers.
    fn on_client_datagrams(&mut self, io: &Sockets) {
        for _ in 0..BATCH {
            let (len, from) = match io.udp.try_recv_from(&mut self.query) {
                Ok(r) => r,
                Err(_) => return,
            };
            let network = match from.ip() {
                IpAddr::V4(ip) if !self.names.siblings.is_empty() => {
                    self.names.network_for(&self.network, ip, &self.query[..len])
                }
                _ => &self.network,
            };
            let outcome = self.resolver.answer(
                &self.names.table,
                network,
                &self.query[..len],
                Transport::Udp,
                &mut self.rng,
                &mut self.out,
                &mut self.counters,
            );
            match outcome {
                Outcome::Answer { len } | Outcome::NotFoundInternal { len } => {
                    if io.udp.try_send_to(&self.out[..len], from).is_err() {
                        self.shell.send_failed += 1;
                    }
                }
                Outcome::Forward => {
                    let q = &self.query[..len];
                    let t = self.fwd.forward(q, Client::Udp(from), Instant::now(), &mut self.out, &mut self.counters);
                    if let Some(t) = t {
                        self.transmit(t, io);
                    }
                }
                Outcome::Drop(_) => {}
            }
        }
    }

    /// Up to [`BATCH`] replies from upstreams (the forwarder checks who sent them).
    fn on_upstream_datagrams(&mut self, socket: &UdpSocket, io: &Sockets) {
        for _ in 0..BATCH {
            let (len, from) = match socket.try_recv_from(&mut self.query) {
                Ok(r) => r,
                Err(_) => return,
            };
            let t = self.fwd.handle_reply(from, &self.query[..len], Instant::now(), &mut self.out, &mut self.counters);
            if let Some(t) = t {
                self.transmit(t, io);
            }
        }
    }

    fn on_connection(&mut self, stream: TcpStream) {
        if self.tcp_open.load(Ordering::Relaxed) >= MAX_TCP {
            self.shell.tcp_refused += 1;
            return;
        }
        self.shell.tcp_connections += 1;
        let open = OpenConnection::new(&self.tcp_open);
        tokio::spawn(connection(stream, self.tcp_tx.clone(), open));
    }

    fn on_tcp_query(&mut self, q: TcpQuery, io: &Sockets) {
        if q.buf.is_empty() {
            self.shell.tcp_malformed += 1;
            let _ = q.reply.try_send(Vec::new());
            return;
        }
        let network = match q.client {
            IpAddr::V4(ip) if !self.names.siblings.is_empty() => self.names.network_for(&self.network, ip, &q.buf),
            _ => &self.network,
        };
        let outcome = self.resolver.answer(
            &self.names.table,
            network,
            &q.buf,
            Transport::Tcp,
            &mut self.rng,
            &mut self.out,
            &mut self.counters,
        );
        match outcome {
            Outcome::Answer { len } | Outcome::NotFoundInternal { len } => {
                let TcpQuery { mut buf, reply, .. } = q;
                buf.clear();
                buf.extend_from_slice(&self.out[..len]);
                let _ = reply.try_send(buf);
            }
            Outcome::Forward => {
                let Some(slot) = self.tcp_free.pop() else {
                    self.shell.tcp_refused += 1;
                    let _ = q.reply.try_send(Vec::new());
                    return;
                };
                let t = self.fwd.forward(&q.buf, Client::Tcp(slot), Instant::now(), &mut self.out, &mut self.counters);
                self.tcp_slots[slot] = Some(q);
                match t {
                    Some(t) => self.transmit(t, io),
                    None => self.reply_tcp(slot, None),
                }
            }
            Outcome::Drop(_) => {
                let _ = q.reply.try_send(Vec::new());
            }
        }
    }

    /// Sends what the forwarder said to send.
    fn transmit(&mut self, t: Transmit<Client>, io: &Sockets) {
        match t {
            Transmit::Client { client: Client::Udp(to), len } => {
                if io.udp.try_send_to(&self.out[..len], to).is_err() {
                    self.shell.send_failed += 1;
                }
            }
            Transmit::Client { client: Client::Tcp(slot), len } => self.reply_tcp(slot, Some(len)),
            Transmit::Upstream { upstream, len, client: Client::Udp(_) } => {
                let socket = if upstream.is_ipv4() { Some(&io.up4) } else { io.up6.as_ref() };
                // Unsent, the try times out and the next upstream is asked.
                if socket.is_none_or(|s| s.try_send_to(&self.out[..len], upstream).is_err()) {
                    self.shell.send_failed += 1;
                }
            }
            Transmit::Upstream { upstream, len, client: Client::Tcp(_) } => {
                let query = self.out[..len].to_vec();
                tokio::spawn(ask_over_tcp(upstream, query, self.up_tx.clone()));
            }
        }
    }

    /// Hands a TCP connection its reply (`out[..len]`), or closes it (`None`), and frees the slot.
    fn reply_tcp(&mut self, slot: usize, len: Option<usize>) {
        let Some(TcpQuery { mut buf, reply, .. }) = self.tcp_slots[slot].take() else { return };
        self.tcp_free.push(slot);
        buf.clear();
        if let Some(len) = len {
            buf.extend_from_slice(&self.out[..len]);
        }
        let _ = reply.try_send(buf);
    }
}

/// Counts an open TCP connection while it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> OpenConnection {
        open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(open))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client's TCP connection: length-prefixed queries, one at a time, each answered before
/// the next is read; closed when idle, on a malformed message or a query that gets no reply.
async fn connection(mut stream: TcpStream, queries: mpsc::Sender<TcpQuery>, _open: OpenConnection) {
    let Ok(client) = stream.peer_addr().map(|a| a.ip()) else { return };
    let (reply_tx, mut reply_rx) = mpsc::channel(1);
    let mut buf = Vec::with_capacity(512);
    let mut framed = Vec::with_capacity(514);
    loop {
        let mut len = [0u8; 2];
        if !matches!(tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await, Ok(Ok(_))) {
            return;
        }
        buf.clear();
        buf.resize(usize::from(u16::from_be_bytes(len)), 0);
        if !matches!(tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf)).await, Ok(Ok(_))) {
            return;
        }
        if queries.send(TcpQuery { buf, reply: reply_tx.clone(), client }).await.is_err() {
            return;
        }
        buf = match tokio::time::timeout(TCP_REPLY_WAIT, reply_rx.recv()).await {
            Ok(Some(b)) if !b.is_empty() => b,
            _ => return,
        };
        framed.clear();
        framed.extend_from_slice(&(buf.len() as u16).to_be_bytes());
        framed.extend_from_slice(&buf);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// One try of a TCP client's query with an upstream, over TCP; the reply goes to the network's
/// task (which checks it), nothing if the try fails (the forwarder's timer moves on).
async fn ask_over_tcp(upstream: SocketAddr, query: Vec<u8>, replies: mpsc::Sender<(SocketAddr, Vec<u8>)>) {
    let attempt = ForwarderConfig::default().attempt_timeout;
    let exchange = async {
        let mut s = TcpStream::connect(upstream).await?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
        framed.extend_from_slice(&query);
        s.write_all(&framed).await?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await?;
        let mut reply = vec![0; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut reply).await?;
        std::io::Result::Ok(reply)
    };
    if let Ok(Ok(reply)) = tokio::time::timeout(attempt, exchange).await {
        let _ = replies.send((upstream, reply)).await;
    }
}
