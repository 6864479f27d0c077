//! The control port's transport: TCP with mutual TLS 1.3, carrying gRPC. Clients open channels
//! as a node ([`connect`]) or as a joiner that pins the cluster CA by its digest
//! ([`connect_pinned`]); servers accept through [`incoming`], whose [`Admission`] keeps a flood of
//! unfinished handshakes from locking cluster members out. Certificates come from [`crate::pki`].

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::pki::{ALPN_H2, NodeIdentity, Role, SERVER_NAME, peer_identity, provider, sha256};
use crate::state::ClusterView;

/// After a failed `accept` (e.g. out of file descriptors), wait this long before the next one.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Why a connection to another node could not be made.
#[derive(thiserror::Error, Debug)]
pub enum TransportError {
    /// A TCP connection to `addr` could not be made (refused, no route, host down).
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        /// The address dialled.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The server at `addr` presented a certificate we do not trust. While joining, this means
    /// the manager belongs to another cluster than the token (or the token is mistyped).
    #[error("{addr} presented a certificate we do not trust: {reason}")]
    UntrustedServer {
        /// The address dialled.
        addr: SocketAddr,
        /// Why the certificate was refused.
        reason: String,
    },
    /// The TLS handshake with `addr` failed for a reason other than its certificate.
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        /// The address dialled.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Opening a gRPC channel to `addr` failed (unreachable, refused, TLS or HTTP/2 failure).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting to `addr` took longer than the timeout given.
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout {
        /// The address dialled.
        addr: SocketAddr,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The CA certificate a server presented has another SHA-256 digest than the one pinned
    /// (the join token's). The pinning verifier's reason, inside [`TransportError::UntrustedServer`].
    #[error("the server's cluster CA does not match the join token's CA digest (is the token for this cluster?)")]
    CaDigestMismatch,
    /// A server being pinned by CA digest did not send its CA certificate after its own.
    #[error("the server did not present its cluster CA certificate")]
    NoCaPresented,
}

/// The name a client verifies in a node's certificate.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a valid DNS name")
}

/// Accepts a server whose chain ends in the CA certificate with the pinned digest and whose leaf
/// that CA signed for [`SERVER_NAME`]; used by joiners, which know only the token.
#[derive(Debug)]
struct PinnedCaVerifier {
    ca_digest: [u8; 32],
    provider: Arc<CryptoProvider>,
}

fn cert_error(e: TransportError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (ca, intermediates) = intermediates.split_last().ok_or(cert_error(TransportError::NoCaPresented))?;
        if sha256(ca) != self.ca_digest {
            return Err(cert_error(TransportError::CaDigestMismatch));
        }
        // The CA is now trusted as if it had come with the token; the leaf must chain to it.
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS client config for a joiner: no client certificate; accepts the server only if the CA certificate it presents (last in its chain) has SHA-256 = `ca_digest` AND the server's leaf certificate is validly signed by that CA for SERVER_NAME. Anything else fails the handshake (so a wrong-cluster token fails with a certificate error).
pub fn pinned_client_config(ca_digest: [u8; 32]) -> Arc<ClientConfig> {
    let provider = provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier { ca_digest, provider }))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// [`peer_identity`] of the peer that sent a request to a server fed by [`incoming`].
pub fn request_peer<T>(request: &tonic::Request<T>) -> Option<(u64, Role)> {
    peer_identity(request.peer_certs().as_deref().map(Vec::as_slice))
}

/// A mutual-TLS gRPC channel to the node at `addr` as `identity`; trusts only the cluster CA.
/// Fails within `timeout` when the node is unreachable (the channel is not lazy).
///
/// tonic's own TLS stack makes the connection, set up like [`NodeIdentity::client_config`]
/// (CA-only trust, node certificate, `SERVER_NAME`): taking a `rustls::ClientConfig` would need a
/// custom connector, whose I/O type must implement hyper's traits, and `hyper-util` is not a
/// dependency of this crate. tonic uses the process-wide rustls provider if one is installed,
/// else ring (the only one compiled in).
pub async fn connect(addr: SocketAddr, identity: &NodeIdentity, timeout: Duration) -> Result<Channel, TransportError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(identity.ca_pem()))
        .identity(tonic::transport::Identity::from_pem(identity.cert_pem(), identity.key_pem()));
    open_channel(addr, tls, timeout).await
}

/// A gRPC channel for a joiner, which has only the token's CA digest: it first fetches the CA
/// certificate through a handshake with [`pinned_client_config`], then opens a channel that trusts
/// only that CA and presents no client certificate. A manager of another cluster fails with
/// [`TransportError::UntrustedServer`]. `timeout` bounds each of the two connections.
pub async fn connect_pinned(
    addr: SocketAddr,
    ca_digest: [u8; 32],
    timeout: Duration,
) -> Result<Channel, TransportError> {
    let ca = fetch_pinned_ca(addr, ca_digest, timeout).await?;
    let mut roots = RootCertStore::empty();
    // The verifier accepted this certificate as the chain's root, so this does not fail.
    roots.add(ca).map_err(|e| TransportError::UntrustedServer { addr, reason: e.to_string() })?;
    open_channel(addr, ClientTlsConfig::new().trust_anchors(roots.roots), timeout).await
}

/// The CA certificate the node at `addr` presents, checked against `ca_digest`.
async fn fetch_pinned_ca(
    addr: SocketAddr,
    ca_digest: [u8; 32],
    timeout: Duration,
) -> Result<CertificateDer<'static>, TransportError> {
    let connector = tokio_rustls::TlsConnector::from(pinned_client_config(ca_digest));
    let handshake = async {
        let tcp = TcpStream::connect(addr).await.map_err(|source| TransportError::Unreachable { addr, source })?;
        let tls = connector.connect(server_name(), tcp).await.map_err(|source| handshake_error(addr, source))?;
        let (_, session) = tls.get_ref();
        // The verifier accepted the chain only if its last certificate is the pinned CA.
        let ca = session.peer_certificates().and_then(<[_]>::last).ok_or(TransportError::NoCaPresented)?;
        // Dropping `tls` closes this probe connection; the channel makes its own.
        Ok(ca.clone().into_owned())
    };
    tokio::time::timeout(timeout, handshake).await.map_err(|_| TransportError::Timeout { addr, timeout })?
}

/// Tells a refused certificate apart from other handshake failures.
fn handshake_error(addr: SocketAddr, source: std::io::Error) -> TransportError {
    match source.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        // Our own verifier's reasons (wrong CA digest, no CA sent) read better without rustls' wrapping.
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(e)))) => {
            TransportError::UntrustedServer { addr, reason: e.to_string() }
        }
        Some(e @ rustls::Error::InvalidCertificate(_)) => {
            TransportError::UntrustedServer { addr, reason: e.to_string() }
        }
        _ => TransportError::Handshake { addr, source },
    }
}

async fn open_channel(addr: SocketAddr, tls: ClientTlsConfig, timeout: Duration) -> Result<Channel, TransportError> {
    let connect_error = |source| TransportError::Connect { addr, source };
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(connect_error)?
        .tls_config(tls.domain_name(SERVER_NAME).timeout(timeout))
        .map_err(connect_error)?
        .connect_timeout(timeout)
        // A peer that vanishes without closing (a partition, a dropped route) is noticed within
        // a few seconds instead of when TCP gives up, so a host moves to another manager.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(Duration::from_secs(5)));
    tokio::time::timeout(timeout, endpoint.connect())
        .await
        .map_err(|_| TransportError::Timeout { addr, timeout })?
        .map_err(connect_error)
}

/// How many TLS handshakes the control port runs at once, and for how long, so that
/// connections that never finish one (a flood, a slowloris) cannot keep members out.
///
/// A connection over a limit is closed (reset) as soon as it is accepted, not left in the
/// kernel's accept queue, where it would wait in line with members' connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// A handshake not done this long after its connection was accepted is dropped, however
    /// much of it has arrived: a connection that sends nothing and one that trickles its
    /// ClientHello a byte at a time both end here. A mutual TLS 1.3 handshake takes two round
    /// trips, so this leaves room for slow links and a busy manager.
    pub timeout: Duration,
    /// Handshakes in progress from one source (an IPv4 address; an IPv6 /64 unless the address
    /// is a member's, since one host may hold a whole /64).
    pub per_source: usize,
    /// Handshakes in progress in all: what bounds the memory the port spends on them.
    pub total: usize,
    /// Of `total`, the slots only members' addresses may take: however many sources an
    /// attacker has, these stay free for the cluster's own hosts.
    pub reserved_for_members: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits { timeout: Duration::from_secs(3), per_source: 8, total: 256, reserved_for_members: 64 }
    }
}

/// Who a handshake in progress is counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    /// The address of a cluster member, exactly.
    Member(IpAddr),
    /// Any other IPv4 address, or IPv6 /64 (its host bits zeroed).
    Other(IpAddr),
}

impl Source {
    fn of(ip: IpAddr, member: bool) -> Source {
        match ip {
            _ if member => Source::Member(ip),
            IpAddr::V4(_) => Source::Other(ip),
            IpAddr::V6(v6) => Source::Other(IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX)))),
        }
    }
}

/// Why a connection was closed without a handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// Its source already had [`HandshakeLimits::per_source`] handshakes in progress.
    SourceBusy,
    /// No slot was free for it: all of [`HandshakeLimits::total`] taken, or, for a source that
    /// is not a member's, all but the reserved ones.
    Full,
}

/// The handshakes in progress, by source, and the admission rule; no I/O.
#[derive(Debug)]
struct Slots {
    limits: HandshakeLimits,
    /// Only sources with a handshake in progress: at most `limits.total` entries.
    by_source: HashMap<Source, usize>,
    members: usize,
    others: usize,
}

impl Slots {
    fn new(limits: HandshakeLimits) -> Slots {
        Slots { limits, by_source: HashMap::new(), members: 0, others: 0 }
    }

    fn in_progress(&self) -> usize {
        self.members + self.others
    }

    /// Takes a slot for a handshake from `source`, or says why not.
    fn admit(&mut self, source: Source) -> Result<(), Refusal> {
        let l = &self.limits;
        if self.by_source.get(&source).is_some_and(|&n| n >= l.per_source) {
            return Err(Refusal::SourceBusy);
        }
        let full = self.in_progress() >= l.total
            || (matches!(source, Source::Other(_)) && self.others >= l.total.saturating_sub(l.reserved_for_members));
        if full {
            return Err(Refusal::Full);
        }
        *self.by_source.entry(source).or_default() += 1;
        match source {
            Source::Member(_) => self.members += 1,
            Source::Other(_) => self.others += 1,
        }
        Ok(())
    }

    /// Gives back a slot [`Slots::admit`] took for `source`.
    fn release(&mut self, source: Source) {
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
            match source {
                Source::Member(_) => self.members -= 1,
                Source::Other(_) => self.others -= 1,
            }
        }
    }
}

/// A slot taken for one handshake; given back when dropped, however the handshake ends (done,
/// failed, timed out, or aborted with the stream).
struct Slot {
    slots: Arc<Mutex<Slots>>,
    source: Source,
    stats: Arc<HandshakeStats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.release(self.source);
        self.stats.in_progress.store(slots.in_progress() as u64, Ordering::Relaxed);
    }
}

/// What the control port did with the connections it accepted.
#[derive(Debug, Default)]
struct HandshakeStats {
    completed: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    refused_source_busy: AtomicU64,
    refused_full: AtomicU64,
    in_progress: AtomicU64,
}

/// A snapshot of the control port's handshake counters (all but `in_progress` only grow), for
/// the agent's status and metrics (`overlayd_control_handshakes_total{result}`,
/// `overlayd_control_connections_refused_total{reason}`, `overlayd_control_handshakes_in_progress`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeCounters {
    /// Handshakes done; the connection went on to gRPC.
    pub completed: u64,
    /// Handshakes that failed: not TLS, or a certificate the cluster CA did not sign.
    pub failed: u64,
    /// Handshakes not done within [`HandshakeLimits::timeout`] (silent or stalled clients).
    pub timed_out: u64,
    /// Connections closed at once: their source had [`HandshakeLimits::per_source`]
    /// handshakes in progress.
    pub refused_source_busy: u64,
    /// Connections closed at once: no slot free for their source (see [`HandshakeLimits`]).
    pub refused_full: u64,
    /// Handshakes in progress now.
    pub in_progress: u64,
}

/// The control port's admission of TLS handshakes: its limits, the addresses of the cluster's
/// members (which may use the slots kept for them), and its counters. Clones share the members
/// and the counters, so the owner keeps one to update the former and read the latter while
/// [`incoming_with`] uses another.
#[derive(Clone, Debug, Default)]
pub struct Admission {
    limits: HandshakeLimits,
    members: Arc<RwLock<HashSet<IpAddr>>>,
    stats: Arc<HandshakeStats>,
}

impl Admission {
    /// An admission with these limits and no members yet.
    pub fn new(limits: HandshakeLimits) -> Admission {
        Admission { limits, ..Admission::default() }
    }

    /// From now on, connections from exactly these addresses count as the cluster's members'.
    pub fn set_members(&self, addrs: impl IntoIterator<Item = IpAddr>) {
        let members = addrs.into_iter().map(|ip| ip.to_canonical()).collect();
        *self.members.write().unwrap_or_else(PoisonError::into_inner) = members;
    }

    /// Keeps the members' addresses at those of the nodes in the latest view (underlay and
    /// control API addresses: a host dials from one of them), until `views`' sender is gone.
    /// A removed node loses its preference with the view that removes it.
    pub fn follow_members(&self, mut views: watch::Receiver<Arc<ClusterView>>) -> tokio::task::JoinHandle<()> {
        let admission = self.clone();
        tokio::spawn(async move {
            loop {
                let view = Arc::clone(&views.borrow_and_update());
                admission.set_members(view.nodes.values().flat_map(|n| [n.underlay_addr, n.api_addr.ip()]));
                if views.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// The counters so far.
    pub fn counters(&self) -> HandshakeCounters {
        let s = &*self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HandshakeCounters {
            completed: get(&s.completed),
            failed: get(&s.failed),
            timed_out: get(&s.timed_out),
            refused_source_busy: get(&s.refused_source_busy),
            refused_full: get(&s.refused_full),
            in_progress: get(&s.in_progress),
        }
    }

    fn is_member(&self, ip: IpAddr) -> bool {
        self.members.read().unwrap_or_else(PoisonError::into_inner).contains(&ip)
    }

    /// A slot for a handshake from `peer` in `slots`, or the connection is to be closed (counted).
    fn admit(&self, slots: &Arc<Mutex<Slots>>, peer: IpAddr) -> Option<Slot> {
        let ip = peer.to_canonical();
        let source = Source::of(ip, self.is_member(ip));
        let mut locked = slots.lock().unwrap_or_else(PoisonError::into_inner);
        match locked.admit(source) {
            Ok(()) => {
                self.stats.in_progress.store(locked.in_progress() as u64, Ordering::Relaxed);
                Some(Slot { slots: Arc::clone(slots), source, stats: Arc::clone(&self.stats) })
            }
            Err(Refusal::SourceBusy) => {
                self.stats.refused_source_busy.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(Refusal::Full) => {
                self.stats.refused_full.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// [`incoming_with`] the default [`HandshakeLimits`] and no members: the per-source limit alone
/// keeps one flooding source from locking others out.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl futures::Stream<Item = Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>> {
    incoming_with(listener, config, Admission::default())
}

/// A stream of accepted TLS connections for `tonic::transport::Server::serve_with_incoming`, from
/// a bound listener. Each handshake runs in its own task, within `admission`'s limits and
/// timeout; a connection over a limit is reset at once and counted. Failures are logged at debug
/// and skipped, never ending the stream; dropping the stream aborts the handshakes in progress.
/// tonic reads the client certificates from the yielded streams, so [`request_peer`] works in
/// handlers.
pub fn incoming_with(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    admission: Admission,
) -> impl futures::Stream<Item = Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>> {
    struct State {
        listener: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        slots: Arc<Mutex<Slots>>,
        admission: Admission,
        /// At most `admission.limits.total` handshakes, as each holds a slot; the finished ones
        /// wait here only until the stream is next polled.
        pending: JoinSet<Option<tokio_rustls::server::TlsStream<TcpStream>>>,
        /// Set after a failed accept: no accepting before then.
        resume_accept: Option<tokio::time::Instant>,
    }
    impl State {
        fn start_handshake(&mut self, tcp: TcpStream, peer: SocketAddr) {
            let Some(slot) = self.admission.admit(&self.slots, peer.ip()) else {
                // A reset leaves no TIME_WAIT behind however many are refused; if it cannot be
                // set, the close is an ordinary one.
                if let Err(e) = tcp.set_zero_linger() {
                    tracing::debug!(%peer, error = %e, "cannot set SO_LINGER on a refused connection");
                }
                return;
            };
            let (accept, timeout) = (self.acceptor.accept(tcp), self.admission.limits.timeout);
            self.pending.spawn(async move {
                // The slot goes back when this task ends, however it ends.
                let stats = &slot.stats;
                match tokio::time::timeout(timeout, accept).await {
                    Ok(Ok(tls)) => {
                        stats.completed.fetch_add(1, Ordering::Relaxed);
                        Some(tls)
                    }
                    Ok(Err(e)) => {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        stats.timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "TLS handshake timed out");
                        None
                    }
                }
            });
        }
    }
    let state = State {
        listener,
        acceptor: tokio_rustls::TlsAcceptor::from(config),
        slots: Arc::new(Mutex::new(Slots::new(admission.limits))),
        admission,
        pending: JoinSet::new(),
        resume_accept: None,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            // Accepting never waits for a free slot: a connection over the limits is refused
            // rather than left in the kernel's queue ahead of a member's.
            tokio::select! {
                accepted = st.listener.accept(), if st.resume_accept.is_none() => match accepted {
                    Ok((tcp, peer)) => st.start_handshake(tcp, peer),
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a control connection failed");
                        st.resume_accept = Some(tokio::time::Instant::now() + ACCEPT_ERROR_BACKOFF);
                    }
                },
                () = tokio::time::sleep_until(st.resume_accept.unwrap_or_else(tokio::time::Instant::now)),
                    if st.resume_accept.is_some() => st.resume_accept = None,
                Some(done) = st.pending.join_next(), if !st.pending.is_empty() => match done {
                    Ok(Some(tls)) => return Some((Ok(tls), st)),
                    Ok(None) => {}
                    // Its slot went back when the task ended; a panic in a handshake is a bug
                    // of the TLS stack, which is no reason to stop serving.
                    Err(e) => tracing::error!(error = %e, "a TLS handshake task ended abnormally"),
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::net::IpAddr;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpSocket;
    use tonic::codegen::{Service, http};

    use crate::pki::ClusterCa;

    fn ca(name: &str) -> ClusterCa {
        ClusterCa::generate(name).unwrap()
    }

    /// The outcome of one TLS connection with a ping/pong exchange: what the server saw (the
    /// client's chain, if any) and whether the client completed.
    struct Outcome {
        server: std::io::Result<Option<Vec<CertificateDer<'static>>>>,
        client: std::io::Result<Vec<CertificateDer<'static>>>,
    }

    async fn exchange(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await?;
            let mut ping = [0u8; 4];
            tls.read_exact(&mut ping).await?;
            tls.write_all(b"pong").await?;
            tls.flush().await?;
            let certs = tls.get_ref().1.peer_certificates().map(<[_]>::to_vec);
            Ok(certs)
        });
        let client = async {
            let tcp = TcpStream::connect(addr).await?;
            let mut tls = tokio_rustls::TlsConnector::from(client).connect(server_name(), tcp).await?;
            tls.write_all(b"ping").await?;
            tls.flush().await?;
            let mut pong = [0u8; 4];
            // In TLS 1.3 the server judges the client certificate after the client's handshake
            // is done: a refusal shows up here.
            tls.read_exact(&mut pong).await?;
            assert_eq!(&pong, b"pong");
            Ok(tls.get_ref().1.peer_certificates().unwrap_or_default().to_vec())
        };
        let client = tokio::time::timeout(Duration::from_secs(10), client).await.expect("client timed out");
        let server = tokio::time::timeout(Duration::from_secs(10), server_task).await.expect("server timed out");
        Outcome { server: server.unwrap(), client }
    }

    /// The rustls error inside a tokio-rustls I/O error.
    fn tls_error(e: &std::io::Error) -> &rustls::Error {
        e.get_ref().and_then(|e| e.downcast_ref()).unwrap_or_else(|| panic!("not a TLS error: {e}"))
    }

    /// The reason our pinning verifier gave, inside a tokio-rustls I/O error.
    fn verifier_error(e: &std::io::Error) -> &TransportError {
        match tls_error(e) {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(e))) => {
                e.downcast_ref().expect("a TransportError")
            }
            other => panic!("not our verifier's error: {other}"),
        }
    }

    fn peer(certs: &[CertificateDer<'static>]) -> Option<(u64, Role)> {
        peer_identity(Some(certs))
    }

    #[tokio::test]
    async fn mutual_tls_between_nodes_of_one_cluster() {
        let ca = ca("one");
        let manager = ca.issue_node(1, Role::Manager).unwrap();
        let worker = ca.issue_node(7, Role::Worker).unwrap();
        let out = exchange(manager.server_config().unwrap(), worker.client_config().unwrap()).await;
        let seen_by_server = out.server.unwrap().expect("server saw a client certificate");
        assert_eq!(peer(&seen_by_server), Some((7, Role::Worker)));
        let seen_by_client = out.client.unwrap();
        assert_eq!(seen_by_client.len(), 2, "server presents [node, CA]");
        assert_eq!(peer(&seen_by_client), Some((1, Role::Manager)));
        assert_eq!(sha256(&seen_by_client[1]), ca.digest());
    }

    #[tokio::test]
    async fn client_of_another_cluster_is_refused_and_anonymous_client_accepted() {
        let ours = ca("ours");
        let theirs = ca("theirs");
        let server = ours.issue_node(1, Role::Manager).unwrap().server_config().unwrap();

        // A client with a cert from another CA, that (wrongly) trusts our CA: the server refuses it.
        let stranger = theirs.issue_node(2, Role::Worker).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(ours.cert_der())).unwrap();
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![stranger.cert_der().clone()], stranger.key())
            .unwrap();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let out = exchange(server.clone(), Arc::new(config)).await;
        let err = out.server.expect_err("server accepted a certificate of another CA");
        assert_eq!(tls_error(&err), &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        assert!(out.client.is_err());

        // A client without a certificate (a joiner) gets through, and the server can tell.
        let out = exchange(server, pinned_client_config(ours.digest())).await;
        assert_eq!(out.server.unwrap(), None);
        assert!(out.client.is_ok());
    }

    #[tokio::test]
    async fn pinned_client_checks_the_ca_digest_and_the_leaf() {
        let ours = ca("ours");
        let theirs = ca("theirs");
        let server = ours.issue_node(1, Role::Manager).unwrap().server_config().unwrap();

        let out = exchange(server.clone(), pinned_client_config(ours.digest())).await;
        assert_eq!(peer(&out.client.unwrap()), Some((1, Role::Manager)));

        let out = exchange(server, pinned_client_config(theirs.digest())).await;
        let err = out.client.unwrap_err();
        assert!(matches!(verifier_error(&err), TransportError::CaDigestMismatch), "{err}");

        // An impostor with a leaf from another CA, appending our (public) CA certificate.
        let impostor = theirs.issue_node(1, Role::Manager).unwrap();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![impostor.cert_der().clone(), CertificateDer::from(ours.cert_der())], impostor.key())
            .unwrap();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let out = exchange(Arc::new(config), pinned_client_config(ours.digest())).await;
        let err = out.client.expect_err("pinned client accepted a leaf our CA did not sign");
        assert_eq!(tls_error(&err), &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));

        // A server that sends no CA certificate at all.
        let ours_leaf_only = ours.issue_node(3, Role::Manager).unwrap();
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ours_leaf_only.cert_der().clone()], ours_leaf_only.key())
            .unwrap();
        let out = exchange(Arc::new(config), pinned_client_config(ours.digest())).await;
        let err = out.client.unwrap_err();
        assert!(matches!(verifier_error(&err), TransportError::NoCaPresented), "{err}");
    }

    /// A gRPC service that answers every call with the caller's identity in a header.
    #[derive(Clone)]
    struct Whoami;

    impl tonic::server::NamedService for Whoami {
        const NAME: &'static str = "overlayd.test.Whoami";
    }

    impl Service<http::Request<tonic::body::Body>> for Whoami {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = futures::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            let who = match request_peer(&tonic::Request::from_http(req)) {
                Some((id, role)) => format!("{id} {role}"),
                None => "anonymous".to_owned(),
            };
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "0")
                .header("x-peer", who)
                .body(tonic::body::Body::empty())
                .unwrap();
            futures::future::ready(Ok(response))
        }
    }

    async fn whoami(channel: &mut Channel) -> String {
        futures::future::poll_fn(|cx| channel.poll_ready(cx)).await.unwrap();
        let req = http::Request::builder()
            .method("POST")
            .uri("/overlayd.test.Whoami/Get")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::empty())
            .unwrap();
        let resp = channel.call(req).await.unwrap();
        resp.headers()["x-peer"].to_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn tonic_over_incoming_and_connect() {
        let server = WhoamiServer::start("grpc", Admission::default()).await;
        let (ca, worker, addr) = (&server.ca, &server.worker, server.addr);
        let timeout = Duration::from_secs(5);

        // Junk and a silent connection do not end the stream.
        let mut junk = TcpStream::connect(addr).await.unwrap();
        junk.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        drop(junk);
        let _silent = TcpStream::connect(addr).await.unwrap();

        let mut channel = connect(addr, worker, timeout).await.unwrap();
        assert_eq!(whoami(&mut channel).await, "7 worker");

        let mut joiner = connect_pinned(addr, ca.digest(), timeout).await.unwrap();
        assert_eq!(whoami(&mut joiner).await, "anonymous");

        let err = connect_pinned(addr, ClusterCa::generate("other").unwrap().digest(), timeout).await.unwrap_err();
        assert!(matches!(err, TransportError::UntrustedServer { .. }), "{err}");
        assert!(err.to_string().contains("does not match the join token"), "{err}");

        // A node of another cluster cannot open a channel.
        let stranger = ClusterCa::generate("other").unwrap().issue_node(2, Role::Worker).unwrap();
        assert!(connect(addr, &stranger, timeout).await.is_err());
    }

    /// Opens `n` TCP connections from `source` to `addr` that never complete a handshake: every
    /// other one sends nothing at all, the rest the first bytes of a ClientHello and then stall.
    /// The connections live as long as the returned set; this waits until all are established
    /// (or refused) or a second has passed (the server's accept queue may be full).
    async fn half_open(source: IpAddr, addr: SocketAddr, n: usize) -> tokio::task::JoinSet<()> {
        // A handshake record announcing 512 bytes, of which the ClientHello's first 6 come.
        const PARTIAL_CLIENT_HELLO: [u8; 11] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
        let established = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut flood = tokio::task::JoinSet::new();
        for i in 0..n {
            let established = Arc::clone(&established);
            flood.spawn(async move {
                let socket = TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::new(source, 0)).unwrap();
                let connected = socket.connect(addr).await;
                established.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // On loopback the server's reset of a refused connection can beat `connect`.
                let mut tcp = match connected {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                    connected => connected.unwrap(),
                };
                if i % 2 == 1 {
                    // The server may have closed it already (over its limits): that is fine here.
                    let _ = tcp.write_all(&PARTIAL_CLIENT_HELLO).await;
                }
                std::future::pending::<()>().await;
            });
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while established.load(std::sync::atomic::Ordering::Relaxed) < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        flood
    }

    /// A manager of a new cluster serving [`Whoami`] on a loopback port through
    /// [`incoming_with`] `admission`, and a worker of the same cluster; stops when dropped.
    struct WhoamiServer {
        ca: ClusterCa,
        worker: NodeIdentity,
        addr: SocketAddr,
        task: tokio::task::JoinHandle<()>,
    }

    impl WhoamiServer {
        async fn start(cluster: &str, admission: Admission) -> WhoamiServer {
            let ca = ca(cluster);
            let manager = ca.issue_node(1, Role::Manager).unwrap();
            let worker = ca.issue_node(7, Role::Worker).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stream = incoming_with(listener, manager.server_config().unwrap(), admission);
            let task = tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_routes(tonic::service::Routes::new(Whoami))
                    .serve_with_incoming(stream)
                    .await;
            });
            WhoamiServer { ca, worker, addr, task }
        }
    }

    impl Drop for WhoamiServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// The attack of issue 12 item 4: 400 connections from one source that never finish their
    /// handshake must not keep a node (or a joiner) from another source out.
    #[tokio::test]
    async fn a_handshake_flood_from_one_source_does_not_block_others() {
        // The default admission, which `incoming` uses: no members known.
        let admission = Admission::default();
        let server = WhoamiServer::start("flood", admission.clone()).await;
        let (ca, worker, addr) = (&server.ca, &server.worker, server.addr);

        let attacker = IpAddr::from([127, 0, 0, 2]);
        let _flood = half_open(attacker, addr, 400).await;

        // The client's source is 127.0.0.1, the loopback route's own address.
        let timeout = Duration::from_secs(2);
        let start = std::time::Instant::now();
        let legit = async {
            let mut channel = connect(addr, worker, timeout).await?;
            let who = whoami(&mut channel).await;
            let mut joiner = connect_pinned(addr, ca.digest(), timeout).await?;
            Ok::<_, TransportError>((who, whoami(&mut joiner).await))
        };
        let (node, joiner) = tokio::time::timeout(2 * timeout, legit)
            .await
            .unwrap_or_else(|_| panic!("no answer within {:?} during the flood", 2 * timeout))
            .unwrap_or_else(|e| panic!("no answer during the flood after {:?}: {e}", start.elapsed()));
        assert_eq!(node, "7 worker");
        assert_eq!(joiner, "anonymous");
        assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
        // Done: the node's handshake, the joiner's CA probe and its channel. In progress: the
        // flood's first 8. The rest of it is reset as soon as it is accepted (all but a few: a
        // burst of 400 overflows the listen backlog of 128, and the kernel drops some).
        let c = admission.counters();
        assert_eq!((c.completed, c.in_progress), (3, 8), "{c:?}");
        until(|| admission.counters().refused_source_busy >= 300).await;
    }

    #[test]
    fn slots_limit_each_source_and_keep_a_reserve_for_members() {
        let limits =
            HandshakeLimits { timeout: Duration::from_secs(1), per_source: 2, total: 6, reserved_for_members: 2 };
        let mut slots = Slots::new(limits);
        let ip = |last: u8| IpAddr::from([10, 0, 0, last]);
        let other = |last| Source::of(ip(last), false);
        let member = |last| Source::of(ip(last), true);

        assert_eq!(slots.admit(other(1)), Ok(()));
        assert_eq!(slots.admit(other(1)), Ok(()));
        assert_eq!(slots.admit(other(1)), Err(Refusal::SourceBusy));
        assert_eq!(slots.admit(other(2)), Ok(()));
        assert_eq!(slots.admit(other(2)), Ok(()));
        // Four of six slots are the others' share; the last two are the members'.
        assert_eq!(slots.admit(other(3)), Err(Refusal::Full));
        assert_eq!(slots.admit(member(1)), Ok(()), "a member's address is not the stranger's source");
        assert_eq!(slots.admit(member(9)), Ok(()));
        assert_eq!(slots.admit(member(8)), Err(Refusal::Full));
        assert_eq!(slots.in_progress(), 6);

        // Slots come back; a source with none in progress leaves no entry behind.
        slots.release(other(1));
        slots.release(other(1));
        assert!(!slots.by_source.contains_key(&other(1)));
        assert_eq!(slots.admit(other(3)), Ok(()));
        assert_eq!(slots.admit(other(3)), Ok(()));
        slots.release(member(9));
        assert_eq!(slots.admit(other(4)), Err(Refusal::Full), "the reserve stays the members'");
        assert_eq!(slots.admit(member(8)), Ok(()));
        assert_eq!(slots.in_progress(), 6);
    }

    #[test]
    fn an_ipv6_source_is_its_64_unless_it_is_a_member() {
        let a: IpAddr = "2001:db8:1:2::a".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::b".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::a".parse().unwrap();
        assert_eq!(Source::of(a, false), Source::of(b, false));
        assert_ne!(Source::of(a, false), Source::of(c, false));
        assert_ne!(Source::of(a, true), Source::of(b, true));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(mapped.to_canonical(), IpAddr::from([10, 0, 0, 1]));
    }

    #[tokio::test]
    async fn members_follow_the_cluster_view() {
        let node = |id: u64, last: u8| crate::state::NodeRecord {
            id,
            name: format!("h{id}"),
            underlay_addr: IpAddr::from([192, 0, 2, last]),
            api_addr: SocketAddr::from(([198, 51, 100, last], 7947)),
            role: Role::Worker,
            status: crate::state::NodeStatus::Ready,
            joined_at: 0,
            gossip_addr: SocketAddr::from(([192, 0, 2, last], 7946)),
            gossip_public_key: [0; 32],
            underlay_networks: Vec::new(),
            underlay_mtu: None,
        };
        let mut view = ClusterView::default();
        view.nodes.insert(1, node(1, 1));
        view.nodes.insert(2, node(2, 2));
        let (tx, rx) = watch::channel(Arc::new(view.clone()));
        let admission = Admission::default();
        let task = admission.follow_members(rx);
        let member = |last| {
            let admission = admission.clone();
            move || admission.is_member(IpAddr::from([192, 0, 2, last]))
        };
        until(member(2)).await;
        assert!(admission.is_member(IpAddr::from([198, 51, 100, 1])), "the API address counts too");

        view.nodes.remove(&2);
        tx.send(Arc::new(view)).unwrap();
        until({
            let admission = admission.clone();
            move || !admission.is_member(IpAddr::from([192, 0, 2, 2]))
        })
        .await;
        assert!(member(1)());
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("follows until the view's sender is gone")
            .unwrap();
    }

    /// Waits (at most 5 s) until `f` holds.
    async fn until(f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "condition not met within 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A TLS handshake as `identity` from `source`: whether the server let it finish.
    async fn handshake_from(source: IpAddr, addr: SocketAddr, identity: &NodeIdentity) -> std::io::Result<()> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let tcp = socket.connect(addr).await?;
        let mut tls =
            tokio_rustls::TlsConnector::from(identity.client_config().unwrap()).connect(server_name(), tcp).await?;
        // The server judges the client certificate after the client is done (TLS 1.3): wait for
        // its first bytes (HTTP/2 settings) to know the handshake was accepted.
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        Ok(())
    }

    #[tokio::test]
    async fn members_keep_their_reserve_against_a_flood_from_many_sources() {
        let limits =
            HandshakeLimits { timeout: Duration::from_secs(30), per_source: 4, total: 16, reserved_for_members: 4 };
        let admission = Admission::new(limits);
        admission.set_members([IpAddr::from([127, 0, 0, 1])]);
        let server = WhoamiServer::start("many", admission.clone()).await;
        let (worker, addr) = (&server.worker, server.addr);

        // Ten sources, each within the per-source limit, take every slot but the members'.
        let mut floods = Vec::new();
        for last in 2..12 {
            floods.push(half_open(IpAddr::from([127, 0, 0, last]), addr, 4).await);
        }
        until(|| admission.counters().in_progress == 12 && admission.counters().refused_full == 40 - 12).await;

        // A stranger with a valid certificate is refused (the reserve is not for addresses);
        // a member is not.
        let timeout = Duration::from_secs(2);
        let refused = tokio::time::timeout(timeout, handshake_from(IpAddr::from([127, 0, 0, 20]), addr, worker)).await;
        assert!(matches!(refused, Ok(Err(_))), "a stranger took a member's slot: {refused:?}");
        let mut channel = tokio::time::timeout(timeout, connect(addr, worker, timeout)).await.unwrap().unwrap();
        assert_eq!(tokio::time::timeout(timeout, whoami(&mut channel)).await.unwrap(), "7 worker");
        let c = admission.counters();
        assert_eq!((c.refused_full, c.refused_source_busy, c.completed, c.in_progress), (40 - 12 + 1, 0, 1, 12));
    }

    #[tokio::test]
    async fn silent_and_stalled_handshakes_time_out() {
        let admission =
            Admission::new(HandshakeLimits { timeout: Duration::from_millis(300), ..HandshakeLimits::default() });
        let server = WhoamiServer::start("slow", admission.clone()).await;
        let addr = server.addr;

        let silent = TcpStream::connect(addr).await.unwrap();
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
        // A slowloris: one more byte every 100 ms does not move the deadline.
        let mut trickle = TcpStream::connect(addr).await.unwrap();
        let start = std::time::Instant::now();
        let trickling = async {
            for b in [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0] {
                if trickle.write_all(&[b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The server's close shows as the end of the stream (or a reset).
            let mut rest = Vec::new();
            let _ = trickle.read_to_end(&mut rest).await;
            start.elapsed()
        };
        let closed = |mut tcp: TcpStream| async move {
            let mut rest = Vec::new();
            let _ = tcp.read_to_end(&mut rest).await;
            start.elapsed()
        };
        let (a, b, c) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(closed(silent), closed(stalled), trickling)
        })
        .await
        .expect("the server kept a handshake open past its timeout");
        for took in [a, b, c] {
            assert!(took >= Duration::from_millis(250) && took < Duration::from_millis(1500), "closed after {took:?}");
        }
        until(|| admission.counters().timed_out == 3 && admission.counters().in_progress == 0).await;
    }

    #[tokio::test]
    async fn connect_fails_fast_when_unreachable() {
        let id = ca("down").issue_node(1, Role::Worker).unwrap();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let start = std::time::Instant::now();
        assert!(connect(addr, &id, Duration::from_secs(5)).await.is_err());
        let err = connect_pinned(addr, [0; 32], Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, TransportError::Unreachable { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
