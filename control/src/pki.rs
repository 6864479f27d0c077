//! The cluster PKI: the cluster CA, node identities (key + CA-signed certificate, saved as
//! files), join tokens, and the TLS configurations an identity gives. Connections made with them
//! are [`crate::transport`]'s; a joiner, which has no certificate yet, pins the CA there by the
//! digest in its token.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::{CryptoRng, RngCore};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest as _, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer as _;
use x509_parser::time::ASN1Time;

/// The DNS name every node certificate carries and every client asks for, so nodes can be reached by any address.
pub const SERVER_NAME: &str = "overlayd";

/// How long the cluster CA is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a node certificate is valid.
const NODE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start this long before they are made, so a peer whose clock is a little behind
/// does not reject a certificate fresh from a manager.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// The only application protocol spoken over these TLS connections (gRPC needs HTTP/2).
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// File names of a saved [`NodeIdentity`].
const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";
const CA_FILE: &str = "ca.crt";

/// Errors of the cluster PKI.
#[derive(thiserror::Error, Debug)]
pub enum PkiError {
    /// Generating a key, CSR or certificate failed, or a private key PEM could not be parsed.
    #[error("certificate or key generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A joiner's certificate signing request could not be parsed or its signature is invalid.
    #[error("invalid certificate signing request: {0}")]
    BadCsr(#[source] rcgen::Error),
    /// A PEM text holds no certificate, or is not valid PEM.
    #[error("{what}: no PEM certificate found")]
    NoCertificate {
        /// Which certificate was expected ("CA certificate", "node certificate").
        what: &'static str,
    },
    /// A certificate's DER could not be parsed as X.509.
    #[error("{what}: not a valid X.509 certificate: {reason}")]
    BadCertificate {
        /// Which certificate it was.
        what: &'static str,
        /// What the parser said.
        reason: String,
    },
    /// A CA certificate given to [`ClusterCa::from_pem`] or a node identity is not a CA certificate.
    #[error("the CA certificate is not a CA (basic constraints CA:TRUE missing)")]
    NotCa,
    /// A node certificate was not signed by the cluster CA it was given with.
    #[error("the node certificate is not signed by the cluster CA")]
    NotSignedByCa,
    /// A certificate and a private key that should belong together do not.
    #[error("the certificate does not match the private key")]
    KeyMismatch,
    /// A certificate's subject does not name a node as `CN=node-<id>, OU=<role>`.
    #[error("not an overlayd node certificate: {reason}")]
    NotNodeCertificate {
        /// What is missing or malformed.
        reason: String,
    },
    /// A role string is neither "manager" nor "worker".
    #[error("unknown node role {role:?} (expected \"manager\" or \"worker\")")]
    UnknownRole {
        /// The string that was given.
        role: String,
    },
    /// Building a rustls configuration failed (key rejected, certificate unusable).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Building the client certificate verifier of a server configuration failed.
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// Reading or writing a node identity file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file of a saved node identity is empty, damaged, or does not belong with the others.
    #[error("{}: {reason}", path.display())]
    BadIdentityFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Some but not all of a node identity's files exist in its directory.
    #[error("{}: incomplete node identity, {missing} is missing (remove the directory's node.key, node.crt and ca.crt to rejoin)", dir.display())]
    IncompleteIdentity {
        /// The directory.
        dir: PathBuf,
        /// The file that is missing.
        missing: &'static str,
    },
    /// The system clock is before 1970 or so far ahead that a certificate's validity cannot be written.
    #[error("the system clock is out of the range certificates can express")]
    ClockOutOfRange,
}

pub use crate::state::Role;

/// The process-independent crypto provider every TLS configuration is built with.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `not_before`/`not_after` for a certificate made at `now`, valid for `lifetime`.
fn validity(params: &mut CertificateParams, now: SystemTime, lifetime: Duration) -> Result<(), PkiError> {
    let time = |t: SystemTime| {
        let secs = t.duration_since(UNIX_EPOCH).map_err(|_| PkiError::ClockOutOfRange)?.as_secs();
        let secs = i64::try_from(secs).map_err(|_| PkiError::ClockOutOfRange)?;
        ASN1Time::from_timestamp(secs).map(|t| t.to_datetime()).map_err(|_| PkiError::ClockOutOfRange)
    };
    params.not_before = time(now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH))?;
    params.not_after = time(now.checked_add(lifetime).ok_or(PkiError::ClockOutOfRange)?)?;
    Ok(())
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // DER INTEGER: keep it positive
    bytes[0] |= 0x01; // and of full length
    SerialNumber::from_slice(&bytes)
}

fn parse_x509<'a>(der: &'a [u8], what: &'static str) -> Result<X509Certificate<'a>, PkiError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| PkiError::BadCertificate { what, reason: e.to_string() })
}

/// The first certificate in a PEM text.
fn first_cert_der(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or(PkiError::NoCertificate { what })?
        .map_err(|e| PkiError::BadCertificate { what, reason: e.to_string() })
}

/// SHA-256 of `bytes`: how CA certificates are pinned.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The node id and role a node certificate names in its subject (`CN=node-<id>, OU=<role>`).
fn node_of(cert: &X509Certificate<'_>) -> Result<(u64, Role), PkiError> {
    let bad = |reason: &str| PkiError::NotNodeCertificate { reason: reason.to_owned() };
    let cn = cert.subject().iter_common_name().next().ok_or_else(|| bad("no common name"))?;
    let cn = cn.as_str().map_err(|_| bad("common name is not a string"))?;
    let id = cn.strip_prefix("node-").ok_or_else(|| bad("common name does not start with node-"))?;
    let id = id.parse::<u64>().map_err(|_| bad("common name node-<id> has no numeric id"))?;
    let ou = cert.subject().iter_organizational_unit().next().ok_or_else(|| bad("no role (OU)"))?;
    let ou = ou.as_str().map_err(|_| bad("role (OU) is not a string"))?;
    let role = ou.parse::<Role>().map_err(|_| bad("role (OU) is neither manager nor worker"))?;
    Ok((id, role))
}

/// The cluster's certificate authority. Created by `overlayd init`, its private key is replicated to managers (so any manager can sign joiners' certificates).
pub struct ClusterCa {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa").field("digest", &hex::encode(self.digest())).finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new self-signed CA: ECDSA P-256, CN "overlayd cluster `cluster_id`", valid 10 years.
    pub fn generate(cluster_id: &str) -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("overlayd cluster {cluster_id}"));
        params.distinguished_name = dn;
        // No intermediates: the CA signs node certificates only.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        validity(&mut params, SystemTime::now(), CA_LIFETIME)?;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa { cert_pem: cert.pem(), cert_der: cert.der().clone(), issuer: Issuer::new(params, key) })
    }

    /// The CA from its certificate and private key (as replicated through Raft).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, PkiError> {
        let cert_der = first_cert_der(cert_pem, "CA certificate")?;
        let key = KeyPair::from_pem(key_pem)?;
        {
            let cert = parse_x509(&cert_der, "CA certificate")?;
            if !cert.is_ca() {
                return Err(PkiError::NotCa);
            }
            if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(PkiError::KeyMismatch);
            }
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(ClusterCa { cert_pem: cert_pem.to_owned(), cert_der, issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA private key, PKCS#8 PEM. A secret: only managers hold it.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> Vec<u8> {
        self.cert_der.to_vec()
    }

    /// SHA-256 of the CA certificate's DER: what join tokens carry and joiners pin.
    pub fn digest(&self) -> [u8; 32] {
        sha256(&self.cert_der)
    }

    /// Signs a node's CSR: the certificate gets CN = "node-<node_id>", OU = role ("manager" or "worker"), SAN DNS = SERVER_NAME, 1 year validity, client+server auth EKU. The CSR's own subject/SANs are ignored.
    pub fn sign_node(&self, csr_der: &[u8], node_id: u64, role: Role) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.into()).map_err(PkiError::BadCsr)?;
        let params = node_params(node_id, role, SystemTime::now())?;
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.pem())
    }

    /// A key and certificate for a node this CA signs directly (used by `init` for the first manager).
    pub fn issue_node(&self, node_id: u64, role: Role) -> Result<NodeIdentity, PkiError> {
        let key = NodeKey::generate()?;
        let cert_pem = self.sign_node(&key.csr_der(&format!("node-{node_id}"))?, node_id, role)?;
        key.into_identity(&cert_pem, &self.cert_pem)
    }
}

/// What every node certificate says; nothing comes from the joiner's CSR but its public key.
fn node_params(node_id: u64, role: Role, now: SystemTime) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("node-{node_id}"));
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(SERVER_NAME.try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    validity(&mut params, now, NODE_LIFETIME)?;
    Ok(params)
}

/// A node's key, certificate (signed by the cluster CA) and the CA certificate.
#[derive(Clone)]
pub struct NodeIdentity {
    key_pem: String,
    cert_pem: String,
    ca_pem: String,
    key_der: Vec<u8>,
    cert_der: CertificateDer<'static>,
    ca_der: CertificateDer<'static>,
    node_id: u64,
    role: Role,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity").field("node_id", &self.node_id).field("role", &self.role).finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// An identity from its three PEM texts; checks the certificate is signed by that CA, matches
    /// the key and names a node.
    pub fn from_pem(key_pem: &str, cert_pem: &str, ca_pem: &str) -> Result<NodeIdentity, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = first_cert_der(cert_pem, "node certificate")?;
        let ca_der = first_cert_der(ca_pem, "CA certificate")?;
        let (node_id, role) = {
            let ca = parse_x509(&ca_der, "CA certificate")?;
            let cert = parse_x509(&cert_der, "node certificate")?;
            if !ca.is_ca() {
                return Err(PkiError::NotCa);
            }
            cert.verify_signature(Some(ca.public_key())).map_err(|_| PkiError::NotSignedByCa)?;
            if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(PkiError::KeyMismatch);
            }
            node_of(&cert)?
        };
        // TLS reads both with webpki, which is stricter than x509-parser (a damaged extension,
        // say): refused here, a damaged file is named instead of failing later as a TLS
        // configuration.
        let unusable = |what| move |e: rustls::Error| PkiError::BadCertificate { what, reason: e.to_string() };
        RootCertStore::empty().add(ca_der.clone()).map_err(unusable("CA certificate"))?;
        rustls::server::ParsedCertificate::try_from(&cert_der).map_err(unusable("node certificate"))?;
        Ok(NodeIdentity {
            key_pem: key_pem.to_owned(),
            cert_pem: cert_pem.to_owned(),
            ca_pem: ca_pem.to_owned(),
            key_der: key.serialize_der(),
            cert_der,
            ca_der,
            node_id,
            role,
        })
    }

    /// The node's private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The node's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The cluster CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The node id, read back from the certificate.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The node's role, read back from the certificate.
    pub fn role(&self) -> Role {
        self.role
    }

    /// SHA-256 of the cluster CA certificate's DER.
    pub fn ca_digest(&self) -> [u8; 32] {
        sha256(&self.ca_der)
    }

    /// Writes `node.key` (mode 0600), `node.crt` and `ca.crt` into `dir`, creating it. Each file
    /// is written to a temporary name, synced and renamed, and the directory synced, so a crash
    /// leaves no half-written file.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| PkiError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for (name, text, mode) in
            [(CA_FILE, &self.ca_pem, 0o644), (CERT_FILE, &self.cert_pem, 0o644), (KEY_FILE, &self.key_pem, 0o600)]
        {
            let path = dir.join(name);
            write_file(&path, text.as_bytes(), mode).map_err(io(&path))?;
        }
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
    }

    /// The identity saved in `dir` by [`save`](Self::save); `None` if none of its files exist.
    pub fn load(dir: &Path) -> Result<Option<NodeIdentity>, PkiError> {
        let mut texts = Vec::with_capacity(3);
        for name in [KEY_FILE, CERT_FILE, CA_FILE] {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => texts.push(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => texts.push(None),
                Err(source) => return Err(PkiError::Io { path, source }),
            }
        }
        match (&texts[0], &texts[1], &texts[2]) {
            (None, None, None) => Ok(None),
            (Some(key), Some(cert), Some(ca)) => {
                let bad = |name: &str, reason: String| PkiError::BadIdentityFile { path: dir.join(name), reason };
                for (name, text) in [(KEY_FILE, key), (CERT_FILE, cert), (CA_FILE, ca)] {
                    if text.trim().is_empty() {
                        return Err(bad(name, "the file is empty".into()));
                    }
                }
                NodeIdentity::from_pem(key, cert, ca).map(Some).map_err(|e| match e {
                    PkiError::Rcgen(e) => bad(KEY_FILE, format!("not a private key: {e}")),
                    PkiError::NotCa => bad(CA_FILE, e.to_string()),
                    PkiError::NoCertificate { what } | PkiError::BadCertificate { what, .. }
                        if what == "CA certificate" =>
                    {
                        bad(CA_FILE, e.to_string())
                    }
                    PkiError::NotSignedByCa => bad(CERT_FILE, format!("not signed by the CA of {CA_FILE}")),
                    PkiError::KeyMismatch => bad(CERT_FILE, format!("not the certificate of the key in {KEY_FILE}")),
                    other => bad(CERT_FILE, other.to_string()),
                })
            }
            _ => {
                let missing = [KEY_FILE, CERT_FILE, CA_FILE].into_iter().zip(&texts).find(|(_, t)| t.is_none());
                let missing = missing.map_or(KEY_FILE, |(name, _)| name);
                Err(PkiError::IncompleteIdentity { dir: dir.to_owned(), missing })
            }
        }
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, PkiError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        Ok(Arc::new(roots))
    }

    /// The node certificate, DER (tests build odd TLS configurations from it).
    #[cfg(test)]
    pub(crate) fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// A TLS 1.3 server configuration presenting [node cert, CA cert]. Client certificates are
    /// optional (a joiner has none yet) but, when given, must chain to the CA: a handler that
    /// needs an authenticated peer checks [`peer_identity`] is `Some`.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, PkiError> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .allow_unauthenticated()
            .build()?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert_der.clone(), self.ca_der.clone()], self.key())?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// A mutual-TLS 1.3 client configuration: trusts only the cluster CA and presents the node
    /// certificate. Connect with [`crate::transport::server_name`] (`SERVER_NAME`).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, PkiError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(vec![self.cert_der.clone()], self.key())?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }
}

/// Writes `bytes` to `path` through a temporary file created with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = write_tmp(&tmp, bytes, mode).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        // A full disk leaves no half-written temporary behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_tmp(tmp: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        options.mode(mode);
        let mut file = options.open(tmp)?;
        // A stale temporary file keeps its old mode; set it explicitly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    #[cfg(not(unix))]
    {
        let _ = mode;
        let mut file = options.open(tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    Ok(())
}

/// A key pair and CSR made by a host that wants to join.
pub struct NodeKey {
    key: KeyPair,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKey").finish_non_exhaustive()
    }
}

impl NodeKey {
    /// A fresh ECDSA P-256 key.
    pub fn generate() -> Result<NodeKey, PkiError> {
        Ok(NodeKey { key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)? })
    }

    /// A CSR for this key. `node_name` only labels it: the manager decides the certificate's subject.
    pub fn csr_der(&self, node_name: &str) -> Result<Vec<u8>, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_name);
        params.distinguished_name = dn;
        Ok(params.serialize_request(&self.key)?.der().to_vec())
    }

    /// This key with the certificate a manager signed for it.
    pub fn into_identity(self, cert_pem: &str, ca_pem: &str) -> Result<NodeIdentity, PkiError> {
        NodeIdentity::from_pem(&self.key.serialize_pem(), cert_pem, ca_pem)
    }
}

/// From a verified peer certificate chain as tonic reports it (`request.peer_certs()`), the
/// peer's node id and role; `None` without a client certificate. Only meaningful on chains rustls
/// has verified (our [`NodeIdentity::server_config`] does): it reads the leaf, it does not check it.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<(u64, Role)> {
    let leaf = certs?.first()?;
    let cert = parse_x509(leaf, "peer certificate").ok()?;
    node_of(&cert).ok()
}

/// The lowercase RFC 4648 base32 alphabet used for token secrets.
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// Random bytes in a token secret.
const SECRET_BYTES: usize = 16;
/// Characters of a token secret: base32 of `SECRET_BYTES`, unpadded.
const SECRET_CHARS: usize = (SECRET_BYTES * 8).div_ceil(5);
/// What every join token starts with; the digit is the format version.
const TOKEN_PREFIX: &str = "OVL1-";

fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity((bytes.len() * 8).div_ceil(5));
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(BASE32[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// Join tokens, in the style of `docker swarm`: `OVL1-<64 hex: sha256 of the CA cert DER>-<secret>`,
/// the secret being 26 characters of lowercase base32 (128 random bits).
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the cluster CA certificate's DER, which the joiner pins.
    pub ca_digest: [u8; 32],
    /// The secret the manager checks against the stored [`JoinToken::secret_hash`].
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken").field("ca_digest", &hex::encode(self.ca_digest)).field("secret", &"..").finish()
    }
}

impl JoinToken {
    /// A new token for `ca` with a secret from the OS random source.
    pub fn generate(ca: &ClusterCa) -> JoinToken {
        JoinToken::generate_with(ca.digest(), &mut rand::rngs::OsRng)
    }

    /// A new token for the CA with digest `ca_digest`, its secret drawn from `rng`.
    pub fn generate_with(ca_digest: [u8; 32], rng: &mut (impl RngCore + CryptoRng)) -> JoinToken {
        let mut secret = [0u8; SECRET_BYTES];
        rng.fill_bytes(&mut secret);
        JoinToken { ca_digest, secret: base32(&secret) }
    }

    /// Hex SHA-256 of a secret: what the cluster state stores (never the secret itself).
    pub fn secret_hash(secret: &str) -> String {
        hex::encode(sha256(secret.as_bytes()))
    }
}

/// What the cluster state keeps of a new cluster's CA and tokens: the CA (its key included, for
/// managers to sign joiners' certificates), the hashes of the tokens' secrets (what a joiner is
/// checked against) and the tokens themselves (for `overlayd join-token` to print).
pub fn cluster_secrets(ca: &ClusterCa, worker: &JoinToken, manager: &JoinToken) -> crate::state::Secrets {
    crate::state::Secrets {
        ca_cert_pem: ca.cert_pem(),
        ca_key_pem: ca.key_pem(),
        worker_token_hash: JoinToken::secret_hash(&worker.secret),
        manager_token_hash: JoinToken::secret_hash(&manager.secret),
        gossip_key: hex::encode(crate::gossip::GossipKey::generate()),
        worker_token: worker.to_string(),
        manager_token: manager.to_string(),
        network_keys: Default::default(),
    }
}

impl JoinToken {
    /// A new token of the cluster whose CA has `ca_digest`, and the command that makes it the
    /// one joiners of `role` need (the old one is refused once it applied).
    pub fn rotation(ca_digest: [u8; 32], role: Role) -> (JoinToken, crate::state::Command) {
        let token = JoinToken::generate_with(ca_digest, &mut rand::rngs::OsRng);
        let cmd = crate::state::Command::RotateJoinToken {
            role,
            token: token.to_string(),
            secret_hash: JoinToken::secret_hash(&token.secret),
        };
        (token, cmd)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}{}-{}", hex::encode(self.ca_digest), self.secret)
    }
}

/// Why a string is not a join token; each message tells the user what to check.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// The text does not start with `OVL1-`.
    #[error("a join token starts with {TOKEN_PREFIX} (copy the whole token printed by `overlayd init`)")]
    MissingPrefix,
    /// The part after the prefix has no `-` separating the CA digest from the secret.
    #[error("the join token has no secret after the CA digest (expected OVL1-<CA digest>-<secret>); was it cut off?")]
    MissingSecret,
    /// The CA digest is not 64 characters long.
    #[error("the CA digest must be 64 hex characters, this one has {0}; was the token cut off?")]
    DigestLength(usize),
    /// The CA digest has a character that is not a hex digit.
    #[error("the CA digest must be 64 hex characters (0-9, a-f), this one has other characters")]
    DigestNotHex,
    /// The secret is empty.
    #[error("the join token's secret (after the CA digest) is empty; was the token cut off?")]
    EmptySecret,
    /// The secret has the wrong length or characters.
    #[error(
        "the join token's secret must be {SECRET_CHARS} characters of a-z and 2-7; was the token cut off or mistyped?"
    )]
    BadSecret,
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<JoinToken, TokenError> {
        let rest = s.trim().strip_prefix(TOKEN_PREFIX).ok_or(TokenError::MissingPrefix)?;
        let (digest, secret) = rest.split_once('-').ok_or(TokenError::MissingSecret)?;
        if digest.len() != 64 {
            return Err(TokenError::DigestLength(digest.chars().count()));
        }
        let mut ca_digest = [0u8; 32];
        hex::decode_to_slice(digest, &mut ca_digest).map_err(|_| TokenError::DigestNotHex)?;
        if secret.is_empty() {
            return Err(TokenError::EmptySecret);
        }
        if secret.len() != SECRET_CHARS || !secret.bytes().all(|b| BASE32.contains(&b)) {
            return Err(TokenError::BadSecret);
        }
        Ok(JoinToken { ca_digest, secret: secret.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(name: &str) -> ClusterCa {
        ClusterCa::generate(name).unwrap()
    }

    #[test]
    fn token_round_trip_and_parse_errors() {
        let ca = ca("tok");
        let token = JoinToken::generate(&ca);
        let text = token.to_string();
        assert!(text.starts_with("OVL1-"));
        assert_eq!(token.secret.len(), 26);
        assert_eq!(text.parse::<JoinToken>().unwrap(), token);
        assert_eq!(format!("  {text}\n").parse::<JoinToken>().unwrap(), token);
        assert_ne!(JoinToken::generate(&ca).secret, token.secret);
        assert!(!format!("{token:?}").contains(&token.secret));

        let digest = hex::encode(ca.digest());
        let secret = &token.secret;
        let parse = |s: &str| s.parse::<JoinToken>().unwrap_err();
        assert_eq!(parse(&format!("{digest}-{secret}")), TokenError::MissingPrefix);
        assert_eq!(parse(&format!("SWMTKN-1-{digest}-{secret}")), TokenError::MissingPrefix);
        assert_eq!(parse(&format!("OVL1-{}-{secret}", &digest[..60])), TokenError::DigestLength(60));
        assert_eq!(parse(&format!("OVL1-{}zz-{secret}", &digest[..62])), TokenError::DigestNotHex);
        assert_eq!(parse(&format!("OVL1-{digest}-")), TokenError::EmptySecret);
        assert_eq!(parse(&format!("OVL1-{digest}")), TokenError::MissingSecret);
        assert_eq!(parse(&format!("OVL1-{digest}-{}", &secret[..20])), TokenError::BadSecret);
        assert_eq!(parse(&format!("OVL1-{digest}-{}", secret.to_uppercase())), TokenError::BadSecret);
        assert!(TokenError::MissingPrefix.to_string().contains("a join token starts with OVL1-"));
        assert!(TokenError::DigestLength(3).to_string().contains("the CA digest must be 64 hex characters"));

        let hash = JoinToken::secret_hash(secret);
        assert_eq!(hash.len(), 64);
        assert_ne!(&hash, secret);
        assert_eq!(hash, JoinToken::secret_hash(secret));
    }

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "my");
        assert_eq!(base32(b"foobar"), "mzxw6ytboi");
        assert_eq!(base32(&[0xff; 16]).len(), SECRET_CHARS);
    }

    #[test]
    fn sign_node_and_from_pem_checks() {
        let ca = ca("sign");
        let key = NodeKey::generate().unwrap();
        let csr = key.csr_der("host-a.example").unwrap();
        let cert_pem = ca.sign_node(&csr, 42, Role::Worker).unwrap();
        let key_pem = key.key.serialize_pem();
        let id = key.into_identity(&cert_pem, &ca.cert_pem()).unwrap();
        assert_eq!((id.node_id(), id.role()), (42, Role::Worker));
        assert_eq!(id.ca_digest(), ca.digest());
        let der = first_cert_der(&cert_pem, "node").unwrap();
        let cert = parse_x509(&der, "node").unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names, [x509_parser::extensions::GeneralName::DNSName(SERVER_NAME)]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());

        // A CSR that is not one.
        assert!(matches!(ca.sign_node(b"garbage", 1, Role::Worker), Err(PkiError::BadCsr(_))));

        // The same key and certificate with another cluster's CA.
        let other = ClusterCa::generate("other").unwrap();
        let err = NodeIdentity::from_pem(&key_pem, &cert_pem, &other.cert_pem()).unwrap_err();
        assert!(matches!(err, PkiError::NotSignedByCa), "{err}");

        // A certificate of our CA, but for another key.
        let someone = ca.issue_node(43, Role::Manager).unwrap();
        let err = NodeIdentity::from_pem(&key_pem, someone.cert_pem(), &ca.cert_pem()).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch), "{err}");

        // The CA survives a PEM round trip and still signs certificates its old self's nodes trust.
        let again = ClusterCa::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.digest(), ca.digest());
        let late = again.issue_node(44, Role::Manager).unwrap();
        NodeIdentity::from_pem(late.key_pem(), late.cert_pem(), &ca.cert_pem()).unwrap();
        assert!(matches!(ClusterCa::from_pem(&ca.cert_pem(), &other.key_pem()), Err(PkiError::KeyMismatch)));
        assert!(matches!(ClusterCa::from_pem(late.cert_pem(), late.key_pem()), Err(PkiError::NotCa)));
    }

    #[test]
    fn role_strings() {
        for role in [Role::Manager, Role::Worker] {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        assert!("boss".parse::<Role>().is_err());
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pki");
        assert!(NodeIdentity::load(&path).unwrap().is_none());
        let id = ca("save").issue_node(9, Role::Manager).unwrap();
        id.save(&path).unwrap();
        id.save(&path).unwrap(); // saving over an existing identity works
        let back = NodeIdentity::load(&path).unwrap().expect("saved identity");
        assert_eq!((back.node_id(), back.role()), (9, Role::Manager));
        assert_eq!((back.key_pem(), back.cert_pem(), back.ca_pem()), (id.key_pem(), id.cert_pem(), id.ca_pem()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(path.join(KEY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_file(path.join(CERT_FILE)).unwrap();
        let err = NodeIdentity::load(&path).unwrap_err();
        assert!(matches!(err, PkiError::IncompleteIdentity { missing: CERT_FILE, .. }), "{err}");
    }

    #[test]
    fn a_damaged_identity_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pki");
        let ca = ca("damage");
        let id = ca.issue_node(9, Role::Worker).unwrap();
        let other = ca.issue_node(10, Role::Worker).unwrap();
        let foreign = ClusterCa::generate("foreign").unwrap();
        for (file, text, says) in [
            (KEY_FILE, "", "the file is empty"),
            (KEY_FILE, "-----BEGIN PRIVATE KEY-----\nxx", "not a private key"),
            (CERT_FILE, "junk", "node certificate"),
            (CERT_FILE, other.cert_pem(), "not the certificate of the key"),
            (CA_FILE, "\n", "the file is empty"),
            (CA_FILE, &foreign.cert_pem(), "not signed by the CA"),
        ] {
            id.save(&path).unwrap();
            std::fs::write(path.join(file), text).unwrap();
            let err = NodeIdentity::load(&path).unwrap_err();
            let named = if says.starts_with("not signed") { CERT_FILE } else { file };
            assert!(
                matches!(&err, PkiError::BadIdentityFile { path: p, .. } if p == &path.join(named)),
                "{file} with {text:?}: {err}"
            );
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    /// Found by the `identity_files` fuzz target: a CA certificate whose key-usage extension
    /// was damaged (one base64 character) still parsed with x509-parser, so the identity
    /// loaded and only its TLS configurations failed, naming no file.
    #[test]
    fn a_ca_certificate_tls_cannot_read_is_refused_at_load() {
        let input = include_bytes!("../testdata/fuzz/identity_files-ca_extension_bad_encoding");
        let parts: Vec<&str> = input[1..].splitn(3, |b| *b == 0).map(|p| std::str::from_utf8(p).unwrap()).collect();
        let err = NodeIdentity::from_pem(parts[0], parts[1], parts[2]).unwrap_err();
        assert!(matches!(err, PkiError::BadCertificate { what: "CA certificate", .. }), "{err}");
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [(KEY_FILE, parts[0]), (CERT_FILE, parts[1]), (CA_FILE, parts[2])] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let err = NodeIdentity::load(dir.path()).unwrap_err();
        assert!(matches!(&err, PkiError::BadIdentityFile { path, .. } if path.ends_with(CA_FILE)), "{err}");
    }
}
