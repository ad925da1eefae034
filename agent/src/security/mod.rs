//! Who may connect and what they may do: device credentials ([`auth`]), node certificates
//! and TLS ([`tls`]), and the `certs` command that makes them ([`certs`]).

pub mod auth;
pub mod certs;
pub mod tls;
