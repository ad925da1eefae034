//! Device authentication on the agent's broker: `[auth]` in the config, password hashes
//! (argon2id, PHC strings) and the check made at CONNECT by the MQTT front end
//! ([`crate::mqtt`]).
//!
//! A device's MQTT username is its device id, and its client id must be the same: the
//! front end checks both at CONNECT and then lets the connection publish only under
//! `sensors/<id>/…`. Why this design and what it does not cover: `docs/agent.md`,
//! "Security".

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize, Serializer};

/// A password hash from the config. Never printed: `Debug` and `Serialize` (which
/// `config check` uses) show a placeholder, so a config dump leaks nothing crackable.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretHash(String);

impl SecretHash {
    pub fn new(phc: impl Into<String>) -> Self {
        SecretHash(phc.into())
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Serialize for SecretHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone may connect and publish for any device: labs only (warned about at start).
    #[default]
    Open,
    /// Only devices listed in `auth.devices`, each only under its own topics.
    Credentials,
}

/// `[auth]` in the agent's config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Device id → argon2 hash of its password (`fogline-agent auth hash`).
    pub devices: BTreeMap<String, SecretHash>,
}

impl AuthConfig {
    pub fn validate(&self) -> Result<(), String> {
        validate_users("auth.devices", &self.devices)?;
        if self.mode == AuthMode::Credentials && self.devices.is_empty() {
            return Err(
                "auth.mode = \"credentials\" needs at least one entry in auth.devices".into(),
            );
        }
        Ok(())
    }
}

/// Checks a table of user names (ids: 1-32 characters of `[A-Za-z0-9_.-]`) and password
/// hashes; `section` names it in errors.
pub fn validate_users(section: &str, users: &BTreeMap<String, SecretHash>) -> Result<(), String> {
    for (id, hash) in users {
        if !fogline_firmware::wire::valid_id(id) {
            return Err(format!(
                "{section}: {id:?} is not a valid name (1-32 characters of [A-Za-z0-9_.-])"
            ));
        }
        PasswordHash::new(&hash.0).map_err(|e| {
            format!("{section}.{id}: not a password hash from `fogline-agent auth hash` ({e})")
        })?;
    }
    Ok(())
}

/// Hashes `password` for `auth.devices` (argon2id, default parameters, random salt).
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Why a CONNECT was refused; also the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    NoCredentials,
    UnknownDevice,
    BadPassword,
    ClientIdMismatch,
    ForeignWill,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoCredentials => "no_credentials",
            Refusal::UnknownDevice => "unknown_device",
            Refusal::BadPassword => "bad_password",
            Refusal::ClientIdMismatch => "client_id_mismatch",
            Refusal::ForeignWill => "foreign_will",
        }
    }
}

/// Checks device credentials. Argon2 is slow on purpose (tens of ms on a Pi), so a
/// successful check is remembered as a keyed digest of (device, password) — a device that
/// reconnects every few seconds does not cost a core, and a wrong password is always
/// checked in full.
pub struct Authenticator {
    devices: HashMap<String, String>,
    verified: Mutex<HashMap<String, [u8; 32]>>,
    cache_key: [u8; 32],
}

impl Authenticator {
    /// Checks the users of `users` (the gateway's dashboards).
    pub fn for_users(users: &BTreeMap<String, SecretHash>) -> Authenticator {
        Authenticator::new(&AuthConfig {
            mode: AuthMode::Credentials,
            devices: users.clone(),
        })
    }

    pub fn new(config: &AuthConfig) -> Authenticator {
        let mut cache_key = [0u8; 32];
        // A fresh random key per process: the cache means nothing outside it.
        let _ =
            argon2::password_hash::rand_core::RngCore::try_fill_bytes(&mut OsRng, &mut cache_key);
        Authenticator {
            devices: config
                .devices
                .iter()
                .map(|(id, h)| (id.clone(), h.0.clone()))
                .collect(),
            verified: Mutex::new(HashMap::new()),
            cache_key,
        }
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// The CONNECT rule: username and password present, a known device, the right
    /// password, and the client id equal to the username (the device id).
    pub fn check(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<(), Refusal> {
        let user = self.check_login(username, password)?;
        if client_id != user {
            return Err(Refusal::ClientIdMismatch);
        }
        Ok(())
    }

    /// Username and password present, a known user, the right password; returns the
    /// user. (The gateway's dashboards: no client id rule.)
    pub fn check_login<'u>(
        &self,
        username: Option<&'u str>,
        password: Option<&[u8]>,
    ) -> Result<&'u str, Refusal> {
        let (Some(user), Some(password)) = (username, password) else {
            return Err(Refusal::NoCredentials);
        };
        let Some(phc) = self.devices.get(user) else {
            return Err(Refusal::UnknownDevice);
        };
        let digest = self.digest(user, password);
        let cached = self
            .verified
            .lock()
            .map(|v| v.get(user) == Some(&digest))
            .unwrap_or(false);
        if !cached {
            let ok = PasswordHash::new(phc)
                .map(|h| Argon2::default().verify_password(password, &h).is_ok())
                .unwrap_or(false);
            if !ok {
                return Err(Refusal::BadPassword);
            }
            if let Ok(mut v) = self.verified.lock() {
                v.insert(user.to_owned(), digest);
            }
        }
        Ok(user)
    }

    fn digest(&self, user: &str, password: &[u8]) -> [u8; 32] {
        // Argon2 at its lowest cost (8 KiB, one pass), salted with the per-process key:
        // a fast keyed digest, so the cache holds nothing a memory dump could reuse.
        use argon2::Params;
        let mut out = [0u8; 32];
        let params = Params::new(8, 1, 1, Some(32)).unwrap_or_default();
        let a = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut input = Vec::with_capacity(user.len() + 1 + password.len());
        input.extend_from_slice(user.as_bytes());
        input.push(0);
        input.extend_from_slice(password);
        let _ = a.hash_password_into(&input, &self.cache_key, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> AuthConfig {
        AuthConfig {
            mode: AuthMode::Credentials,
            devices: pairs
                .iter()
                .map(|(id, pw)| {
                    (
                        (*id).to_owned(),
                        SecretHash::new(hash_password(pw.as_bytes()).expect("hash")),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn only_the_right_password_and_client_id_pass() {
        let c = config(&[("d1", "secret-1"), ("d2", "secret-2")]);
        c.validate().expect("valid");
        let a = Authenticator::new(&c);
        assert_eq!(a.check("d1", Some("d1"), Some(b"secret-1")), Ok(()));
        // Cached path gives the same answers.
        assert_eq!(a.check("d1", Some("d1"), Some(b"secret-1")), Ok(()));
        assert_eq!(
            a.check("d1", Some("d1"), Some(b"secret-2")),
            Err(Refusal::BadPassword)
        );
        assert_eq!(
            a.check("d2", Some("d1"), Some(b"secret-1")),
            Err(Refusal::ClientIdMismatch)
        );
        assert_eq!(
            a.check("d3", Some("d3"), Some(b"x")),
            Err(Refusal::UnknownDevice)
        );
        assert_eq!(a.check("d1", None, None), Err(Refusal::NoCredentials));
    }

    #[test]
    fn hashes_never_appear_in_dumps() {
        let c = config(&[("d1", "secret-1")]);
        let json = serde_json::to_string(&c).expect("json");
        assert!(
            json.contains("<redacted>") && !json.contains("argon2"),
            "{json}"
        );
        assert!(!format!("{c:?}").contains("argon2"));
    }
}
