//! TLS for node links (the agent's uplink to the gateway, and the links between peers): load
//! the site CA, this node's certificate and its key, and build rustls configs that
//! require the other side to hold a certificate signed by the same site CA.
//!
//! One place for it, so the gateway (through its dependency on this crate) and the
//! cluster's peer links use the same checks:
//! - a private key readable by group or others is refused with a clear error (like ssh);
//! - the server side requires a client certificate chaining to the site CA
//!   ([`NodeIdentity::server_config`]);
//! - the client side verifies the server against the site CA only, never the system's
//!   roots, and presents this node's certificate ([`NodeIdentity::client_config`]).
//!
//! rustls runs with the `ring` provider, chosen explicitly (no process-wide default, no
//! C toolchain for aarch64 builds).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

/// `[tls]` in the agent's and the gateway's config. All three empty: TLS off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The site CA certificate (`ca.pem` from `certs init`).
    pub ca: PathBuf,
    /// This node's certificate (`<node-id>.pem` from `certs node`).
    pub cert: PathBuf,
    /// This node's private key (`<node-id>.key`), mode 0600 or stricter.
    pub key: PathBuf,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !(self.ca.as_os_str().is_empty()
            && self.cert.as_os_str().is_empty()
            && self.key.as_os_str().is_empty())
    }

    /// All three set, or none.
    pub fn validate(&self) -> Result<(), String> {
        if self.enabled()
            && (self.ca.as_os_str().is_empty()
                || self.cert.as_os_str().is_empty()
                || self.key.as_os_str().is_empty())
        {
            return Err("tls.ca, tls.cert and tls.key must be set together (or none)".into());
        }
        Ok(())
    }
}

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by group or others (mode {mode:o}); a private key must be \
         private: chmod 600 {path}"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(String),
}

/// Reads a private file (a key), refusing it when group or others may read it.
pub fn read_private(path: &Path) -> Result<String, TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyPermissions {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    std::fs::read_to_string(path).map_err(io)
}

/// The provider every fogline TLS config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a certificate names a site: a SAN URI `urn:fogline:site:<site>`.
pub const SITE_URI_PREFIX: &str = "urn:fogline:site:";

/// The site a certificate names ([`SITE_URI_PREFIX`]), if any.
pub fn cert_site(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let sans = cert.subject_alternative_name().ok()??;
    sans.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => uri
            .strip_prefix(SITE_URI_PREFIX)
            .filter(|s| fogline_firmware::wire::valid_id(s))
            .map(str::to_owned),
        _ => None,
    })
}

/// The raw issuer name of a certificate (to find the CA that signed it).
pub fn cert_issuer(der: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.issuer().as_raw().to_vec())
}

/// This node's TLS identity: the site CA, its certificate chain and key.
#[derive(Debug)]
pub struct NodeIdentity {
    /// The CA certificates, as loaded.
    cas: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl NodeIdentity {
    /// Loads and checks the files named by `config` (which must be enabled).
    pub fn load(config: &TlsConfig) -> Result<NodeIdentity, TlsError> {
        config.validate().map_err(TlsError::Rustls)?;
        let cas = certs(&config.ca)?;
        let mut roots = RootCertStore::empty();
        for cert in cas.iter().cloned() {
            roots.add(cert).map_err(|e| TlsError::Pem {
                path: config.ca.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let chain = certs(&config.cert)?;
        let key_pem = read_private(&config.key)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            path: config.key.clone(),
            reason: format!("no private key: {e}"),
        })?;
        Ok(NodeIdentity {
            cas,
            roots: Arc::new(roots),
            chain,
            key,
        })
    }

    /// A server config that requires a client certificate signed by the site CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_with(false)
    }

    /// A server config that asks for a client certificate signed by one of the CAs but
    /// also lets clients without one in (the gateway's dashboards, who log in instead).
    pub fn server_config_optional_client(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_with(true)
    }

    fn server_with(&self, optional_client: bool) -> Result<Arc<ServerConfig>, TlsError> {
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        if optional_client {
            verifier = verifier.allow_unauthenticated();
        }
        let verifier = verifier
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        Ok(Arc::new(config))
    }

    /// The CAs bound to a site (`certs init --site`), by their raw subject name: a node
    /// certificate one of them signed is taken for that site only.
    pub fn ca_sites(&self) -> std::collections::HashMap<Vec<u8>, String> {
        self.cas
            .iter()
            .filter_map(|der| {
                let site = cert_site(der)?;
                let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
                Some((cert.subject().as_raw().to_vec(), site))
            })
            .collect()
    }

    /// A client config that trusts only the site CA and presents this node's certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        Ok(Arc::new(config))
    }
}

/// This node's client config, for its uplink and its links to peers: `None` when
/// `[tls]` is off (`uplink_on` says whether to warn that the uplink is plain).
pub fn client_tls(
    config: &TlsConfig,
    uplink_on: bool,
) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    if !config.enabled() {
        if uplink_on {
            tracing::warn!("tls is off: the uplink to the gateway is plain MQTT, unauthenticated");
        }
        return Ok(None);
    }
    NodeIdentity::load(config)?.client_config().map(Some)
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// The common name of a peer's first certificate (fogline puts the node id there), for
/// logs. None when there is no certificate or it does not parse.
pub fn peer_name(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let der = certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The refusal reason (a `fogline_connections_refused_total` label) and what to log for a
/// failed TLS handshake.
pub fn classify_tls(e: &std::io::Error) -> (&'static str, String) {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::NoCertificatesPresented) => (
            "no_certificate",
            "the node presented no client certificate".into(),
        ),
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
        )) => (
            "unknown_ca",
            "the client certificate is not signed by this site's CA".into(),
        ),
        Some(rustls::Error::InvalidCertificate(e)) => (
            "bad_certificate",
            format!("the client certificate is not acceptable: {e}"),
        ),
        Some(other) => ("tls_handshake", other.to_string()),
        None => ("tls_handshake", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.key");
        std::fs::write(&path, "x").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_private(&path).expect_err("refused");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(read_private(&path).expect("read"), "x");
    }
}
