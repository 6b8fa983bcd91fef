//! Query strings: the few parameters the API takes, percent-encoded.

/// `application/x-www-form-urlencoded` decoding of `a=b&c=d`.
pub fn parse(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// The value of `key` in `query`, if present.
pub fn get(query: Option<&str>, key: &str) -> Option<String> {
    parse(query?)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len()
                && hex(bytes[i + 1]).is_some()
                && hex(bytes[i + 2]).is_some() =>
            {
                out.push(hex(bytes[i + 1]).unwrap() * 16 + hex(bytes[i + 2]).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_encoding_and_decoding() {
        for v in ["plain", "with space", "a&b=c", "ünïcode/ß", "100%"] {
            let q = format!("k={}&other=1", encode(v));
            assert_eq!(get(Some(&q), "k").as_deref(), Some(v));
        }
        assert_eq!(get(Some("a=1+2"), "a").as_deref(), Some("1 2"));
        assert_eq!(get(Some("a=1"), "b"), None);
        assert_eq!(get(None, "a"), None);
    }
}
