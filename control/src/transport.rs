//! The control port's transport: TCP with mutual TLS 1.3, carrying gRPC. Clients open channels
//! as a node ([`connect`]) or as a joiner that pins the cluster CA by its digest
//! ([`connect_pinned`]); servers accept through [`incoming`]. Certificates come from [`crate::pki`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt as _};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::pki::{ALPN_H2, NodeIdentity, Role, SERVER_NAME, peer_identity, provider, sha256};

/// A TLS handshake on the server side that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many server-side handshakes run at once; further connections wait in the
/// kernel's accept queue.
const MAX_PENDING_HANDSHAKES: usize = 256;
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

/// A stream of accepted TLS connections for `tonic::transport::Server::serve_with_incoming`, from
/// a bound listener. Handshakes run concurrently (at most `MAX_PENDING_HANDSHAKES`, each bounded
/// by `HANDSHAKE_TIMEOUT`) and only while the stream is polled; failures are logged at debug and
/// skipped, never ending the stream. tonic reads the client certificates from the yielded
/// streams, so [`request_peer`] works in handlers.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl futures::Stream<Item = Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>> {
    type Handshake = Pin<Box<dyn Future<Output = Option<tokio_rustls::server::TlsStream<TcpStream>>> + Send>>;
    struct State {
        listener: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        pending: FuturesUnordered<Handshake>,
        /// Set after a failed accept: no accepting before then.
        resume_accept: Option<tokio::time::Instant>,
    }
    let state = State {
        listener,
        acceptor: tokio_rustls::TlsAcceptor::from(config),
        pending: FuturesUnordered::new(),
        resume_accept: None,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            let can_accept = st.resume_accept.is_none() && st.pending.len() < MAX_PENDING_HANDSHAKES;
            tokio::select! {
                accepted = st.listener.accept(), if can_accept => match accepted {
                    Ok((tcp, peer)) => {
                        let accept = st.acceptor.accept(tcp);
                        st.pending.push(Box::pin(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                                Ok(Ok(tls)) => Some(tls),
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    None
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    None
                                }
                            }
                        }));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a control connection failed");
                        st.resume_accept = Some(tokio::time::Instant::now() + ACCEPT_ERROR_BACKOFF);
                    }
                },
                () = tokio::time::sleep_until(st.resume_accept.unwrap_or_else(tokio::time::Instant::now)),
                    if st.resume_accept.is_some() => st.resume_accept = None,
                Some(done) = st.pending.next(), if !st.pending.is_empty() => {
                    if let Some(tls) = done {
                        return Some((Ok(tls), st));
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
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
        let ca = ca("grpc");
        let manager = ca.issue_node(1, Role::Manager).unwrap();
        let worker = ca.issue_node(7, Role::Worker).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = incoming(listener, manager.server_config().unwrap());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(tonic::service::Routes::new(Whoami))
                .serve_with_incoming(stream),
        );
        let timeout = Duration::from_secs(5);

        // Junk and a silent connection do not end the stream.
        let mut junk = TcpStream::connect(addr).await.unwrap();
        junk.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        drop(junk);
        let _silent = TcpStream::connect(addr).await.unwrap();

        let mut channel = connect(addr, &worker, timeout).await.unwrap();
        assert_eq!(whoami(&mut channel).await, "7 worker");

        let mut joiner = connect_pinned(addr, ca.digest(), timeout).await.unwrap();
        assert_eq!(whoami(&mut joiner).await, "anonymous");

        let err = connect_pinned(addr, ClusterCa::generate("other").unwrap().digest(), timeout).await.unwrap_err();
        assert!(matches!(err, TransportError::UntrustedServer { .. }), "{err}");
        assert!(err.to_string().contains("does not match the join token"), "{err}");

        // A node of another cluster cannot open a channel.
        let stranger = ClusterCa::generate("other").unwrap().issue_node(2, Role::Worker).unwrap();
        assert!(connect(addr, &stranger, timeout).await.is_err());

        server.abort();
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
