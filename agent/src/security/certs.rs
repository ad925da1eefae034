//! `fogline-agent certs`: a site CA and node certificates (rcgen), because certificate
//! setup is where users give up.
//!
//! A node certificate is usable both as a TLS server certificate (an agent's or the
//! gateway's listener) and as a client certificate (an agent's uplink, a peer link): its
//! SANs are the node id plus every `--host` name or IP address, and its extended key
//! usages are serverAuth and clientAuth. The node id is also its common name, so the other
//! side can log which node a certificate belongs to.
//!
//! Keys are ECDSA P-256 (small, fast on a Pi), written with mode 0600; existing files are
//! never overwritten.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; remove it first (certificates are never overwritten)")]
    Exists(PathBuf),
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid name {0:?}: {1}")]
    Name(String, String),
}

/// The files a command wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn this_year() -> i32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Good enough for validity bounds: the year to within a day.
    1970 + i32::try_from(secs / 31_556_952).unwrap_or(0)
}

fn validity(params: &mut CertificateParams, years: i32) {
    let year = this_year();
    // From the start of last year, so a node whose clock lags a little still accepts it.
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

/// `certs init`: a new CA in `out` (`ca.pem`, `ca.key`). `name` goes into its common
/// name, e.g. the site id. With `site`, the CA is bound to that site: the gateway takes
/// the node certificates it signs only for that site (a per-site CA); without, it is a
/// fleet CA whose node certificates name their own site.
pub fn init(out: &Path, name: &str, site: Option<&str>) -> Result<Written, CertsError> {
    let cert_path = out.join("ca.pem");
    let key_path = out.join("ca.key");
    refuse_existing(&[&cert_path, &key_path])?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fogline");
    // A random suffix keeps two sites' CAs apart by name too, so a certificate from the
    // wrong site is reported as "unknown issuer" rather than a bad signature.
    dn.push(
        DnType::CommonName,
        format!("fogline site CA {name} {:08x}", fastrand::u32(..)),
    );
    params.distinguished_name = dn;
    if let Some(site) = site {
        params.subject_alt_names = vec![site_uri(site)?];
    }
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, 20);
    let cert = params.self_signed(&key)?;
    create_dir(out)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Written {
        cert: cert_path,
        key: key_path,
    })
}

/// `certs node`: a certificate for `node_id` signed by the CA in `ca_dir`, written to
/// `out/<node_id>.pem` and `out/<node_id>.key`. `hosts` are extra SANs (DNS names or IP
/// addresses) that clients will use to reach this node. With `site`, the certificate
/// names the node's site (a SAN URI `urn:fogline:site:<site>`): the gateway takes its
/// uplink for that site only, and refuses a node certificate without one.
pub fn node(
    ca_dir: &Path,
    node_id: &str,
    hosts: &[String],
    out: &Path,
    site: Option<&str>,
) -> Result<Written, CertsError> {
    if !fogline_firmware::wire::valid_id(node_id) {
        return Err(CertsError::Name(
            node_id.to_owned(),
            "a node id is 1-32 characters of [A-Za-z0-9_.-]".into(),
        ));
    }
    let ca_cert_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca.key");
    let ca_pem = read_text(&ca_cert_path)?;
    let ca_key_pem =
        crate::security::tls::read_private(&ca_key_path).map_err(|e| CertsError::Invalid {
            path: ca_key_path.clone(),
            reason: e.to_string(),
        })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| CertsError::Invalid {
        path: ca_key_path.clone(),
        reason: format!("not a private key: {e}"),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| CertsError::Invalid {
        path: ca_cert_path.clone(),
        reason: format!("not a CA certificate: {e}"),
    })?;

    let cert_path = out.join(format!("{node_id}.pem"));
    let key_path = out.join(format!("{node_id}.key"));
    refuse_existing(&[&cert_path, &key_path])?;

    let mut sans = vec![san(node_id)?];
    for host in hosts {
        let s = san(host)?;
        if !sans.contains(&s) {
            sans.push(s);
        }
    }
    if let Some(site) = site {
        sans.push(site_uri(site)?);
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "fogline");
    dn.push(DnType::CommonName, node_id);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, 10);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    create_dir(out)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Written {
        cert: cert_path,
        key: key_path,
    })
}

fn san(name: &str) -> Result<SanType, CertsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let ia5 = name
        .to_owned()
        .try_into()
        .map_err(|e: rcgen::Error| CertsError::Name(name.to_owned(), e.to_string()))?;
    Ok(SanType::DnsName(ia5))
}

/// The SAN that names a site, read back by [`crate::security::tls::cert_site`].
fn site_uri(site: &str) -> Result<SanType, CertsError> {
    if !fogline_firmware::wire::valid_id(site) {
        return Err(CertsError::Name(
            site.to_owned(),
            "a site id is 1-32 characters of [A-Za-z0-9_.-]".into(),
        ));
    }
    let uri = format!("{}{site}", crate::security::tls::SITE_URI_PREFIX);
    let ia5 = uri
        .clone()
        .try_into()
        .map_err(|e: rcgen::Error| CertsError::Name(uri, e.to_string()))?;
    Ok(SanType::URI(ia5))
}

fn refuse_existing(paths: &[&Path]) -> Result<(), CertsError> {
    for path in paths {
        if path.exists() {
            return Err(CertsError::Exists(path.to_path_buf()));
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), CertsError> {
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn read_text(path: &Path) -> Result<String, CertsError> {
    std::fs::read_to_string(path).map_err(|source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates `path` with `mode` (never overwriting), so a key is never readable by others,
/// not even for a moment.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertsError> {
    let io = |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_is_signed_by_the_site_ca_and_its_key_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = init(dir.path(), "test", None).expect("init");
        let node = node(
            dir.path(),
            "pi-1",
            &["127.0.0.1".into(), "localhost".into()],
            dir.path(),
            Some("farm"),
        )
        .expect("node");
        let der = |path: &Path| {
            let pem = std::fs::read(path).expect("read");
            rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .next()
                .expect("a certificate")
                .expect("pem")
        };
        use rustls::pki_types::pem::PemObject;
        assert_eq!(
            crate::security::tls::cert_site(&der(&node.cert)).as_deref(),
            Some("farm")
        );
        assert_eq!(crate::security::tls::cert_site(&der(&ca.cert)), None);
        use std::os::unix::fs::PermissionsExt;
        for key in [&ca.key, &node.key] {
            let mode = std::fs::metadata(key).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        let id = crate::security::tls::NodeIdentity::load(&crate::security::tls::TlsConfig {
            ca: ca.cert.clone(),
            cert: node.cert.clone(),
            key: node.key.clone(),
        })
        .expect("load");
        id.server_config().expect("server config");
        id.client_config().expect("client config");
        assert!(matches!(
            init(dir.path(), "again", None),
            Err(CertsError::Exists(_))
        ));
    }
}
