//! A tiny HTTP/1.1 client for the agent's local endpoints, and a Prometheus text parser.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context};

/// `GET path` on `addr` with `Connection: close`; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to http://{addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    parse_response(&raw).with_context(|| format!("parsing the answer to GET {path}"))
}

fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().context("empty response")?;
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .context("no status code")?
        .parse()
        .context("bad status code")?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size_text = String::from_utf8_lossy(&body[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).context("chunk size")?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            bail!("chunk shorter than announced");
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or(&[]);
    }
}

/// The value of a Prometheus sample in `text`, `0.0` when absent.
///
/// A sample matches when its name is `name` and it carries every label in `labels`
/// (other labels are allowed); the values of all matching samples are summed, so
/// `metric(t, "fogline_ingest_rejected_total", &[])` is the total over every reason.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((sample_name, sample_labels, value)) = parse_sample(line) else {
            continue;
        };
        if sample_name != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| sample_labels.iter().any(|(sk, sv)| sk == k && sv == v))
        {
            sum += value;
        }
    }
    sum
}

type Sample<'a> = (&'a str, Vec<(String, String)>, f64);

fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let name_end = line.find(['{', ' ', '\t'])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if rest.starts_with('{') {
        let close = find_label_end(rest)?;
        labels = parse_labels(&rest[1..close]);
        rest = &rest[close + 1..];
    }
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

fn find_label_end(s: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return labels;
        }
        if chars.next() != Some('"') {
            return labels;
        }
        let mut value = String::new();
        let mut escaped = false;
        for c in chars.by_ref() {
            if escaped {
                value.push(match c {
                    'n' => '\n',
                    other => other,
                });
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                break;
            } else {
                value.push(c);
            }
        }
        labels.push((key.trim().to_string(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP fogline_ingest_rejected_total Rejected readings.\n\
        # TYPE fogline_ingest_rejected_total counter\n\
        fogline_ingest_rejected_total{reason=\"oversized\"} 3\n\
        fogline_ingest_rejected_total{reason=\"non_finite\",x=\"a,b}\"} 4.0\n\
        fogline_buffer_bytes 1234\n\
        fogline_buffer_bytes_total 9\n\
        # EOF\n";

    #[test]
    fn samples_are_found_by_name_and_labels() {
        assert_eq!(metric(TEXT, "fogline_buffer_bytes", &[]), 1234.0);
        assert_eq!(
            metric(
                TEXT,
                "fogline_ingest_rejected_total",
                &[("reason", "oversized")]
            ),
            3.0
        );
        assert_eq!(
            metric(
                TEXT,
                "fogline_ingest_rejected_total",
                &[("reason", "non_finite")]
            ),
            4.0
        );
        assert_eq!(metric(TEXT, "fogline_ingest_rejected_total", &[]), 7.0);
        assert_eq!(
            metric(TEXT, "fogline_ingest_rejected_total", &[("reason", "nope")]),
            0.0
        );
        assert_eq!(metric(TEXT, "missing", &[]), 0.0);
    }

    #[test]
    fn chunked_bodies_are_joined() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n";
        let (code, body) = parse_response(raw).expect("valid response");
        assert_eq!(code, 200);
        assert_eq!(body, "ok!!!");
    }
}
