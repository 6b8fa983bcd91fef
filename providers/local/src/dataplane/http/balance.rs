//! Picking a target per request: a valid affinity cookie first, else the L4 selector's round
//! robin (with client-IP affinity when configured) over the healthy targets.

use std::net::IpAddr;

use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};

use super::config::BackendPool;

/// The target chosen for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    /// Index into the backend's targets.
    pub index: usize,
    /// The client must be told (again) which target it is pinned to.
    pub set_cookie: bool,
}

impl BackendPool {
    /// `None` when no target may get traffic.
    pub fn pick(&self, headers: &HeaderMap, client: IpAddr) -> Option<Pick> {
        self.pick_with(
            |name| {
                cookie_value(
                    headers.get_all(COOKIE).iter().map(HeaderValue::as_bytes),
                    name,
                )
            },
            client,
        )
    }

    /// [`Self::pick`], given how to find the affinity cookie's value among the request's.
    pub fn pick_with<'a>(
        &self,
        cookie: impl FnOnce(&str) -> Option<&'a str>,
        client: IpAddr,
    ) -> Option<Pick> {
        if let Some(name) = &self.cookie {
            let pinned = cookie(name).and_then(|id| {
                self.targets
                    .iter()
                    .position(|t| t.cookie_id == id)
                    .filter(|&i| self.pool.usable(i))
            });
            if let Some(index) = pinned {
                return Some(Pick {
                    index,
                    set_cookie: false,
                });
            }
            let index = self.state.selector.pick(&self.pool, client, &[])?;
            return Some(Pick {
                index,
                set_cookie: true,
            });
        }
        let index = self.state.selector.pick(&self.pool, client, &[])?;
        Some(Pick {
            index,
            set_cookie: false,
        })
    }
}

/// The value of cookie `name` in the request's `Cookie` headers (HTTP/2 clients may split
/// them into several).
pub fn cookie_value<'a>(
    cookie_headers: impl Iterator<Item = &'a [u8]>,
    name: &str,
) -> Option<&'a str> {
    cookie_headers
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (n, v) = pair.trim().split_once('=')?;
            (n == name).then(|| v.trim_matches('"'))
        })
}

/// RFC 6265 cookie names are RFC 7230 tokens.
pub fn is_valid_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_named_cookie_is_found_among_others_and_across_headers() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1; route=x"));
        h.append(COOKIE, HeaderValue::from_static("b=2;route2=y; lb=\"abc\""));
        let find = |name| cookie_value(h.get_all(COOKIE).iter().map(HeaderValue::as_bytes), name);
        assert_eq!(find("route"), Some("x"));
        assert_eq!(find("lb"), Some("abc"));
        assert_eq!(find("rout"), None);
    }

    #[test]
    fn cookie_names_must_be_tokens() {
        assert!(is_valid_cookie_name("PORTICO_ROUTE"));
        assert!(is_valid_cookie_name("a.b-c"));
        for bad in ["", "a b", "a=b", "a;b", "a,b", "ä", "a\"b", "(x)"] {
            assert!(!is_valid_cookie_name(bad), "{bad:?}");
        }
    }
}
