//! L7 routing: which backend serves a request, by host and path, with exactly the semantics
//! of Kubernetes Ingress v1. Pure, so every provider (the local proxy evaluating it per request,
//! AWS and GCP compiling it into listener rules and URL maps) shares one definition.
//!
//! - Hosts: an exact host, or `*.example.com` matching exactly one more label; no host means
//!   any host. An exact host wins over a wildcard, a wildcard over "any".
//! - Paths: `Exact` is a case-sensitive whole-path match (`/foo` does not match `/foo/`);
//!   `Prefix` matches element-wise on `/` (`/foo/bar` matches `/foo/bar` and `/foo/bar/baz`,
//!   not `/foo/barbaz`; a trailing slash in the rule is ignored).
//! - Precedence: the longest matching path wins; for the same path, `Exact` beats `Prefix`.
//! - The first host group that matches decides; if none of its paths match, the default
//!   backend serves the request, and without one the answer is 404.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum HostMatch {
    /// No host in the rule: every request.
    Any,
    /// A precise host name, compared case-insensitively.
    Exact(String),
    /// `*.<suffix>`: exactly one label followed by `.<suffix>`; holds the suffix.
    Wildcard(String),
}

impl HostMatch {
    /// From an Ingress rule's `host` (empty or absent means any host).
    pub fn parse(host: Option<&str>) -> HostMatch {
        match host.map(str::trim).filter(|h| !h.is_empty()) {
            None => HostMatch::Any,
            Some(h) => match h.strip_prefix("*.") {
                Some(suffix) => HostMatch::Wildcard(suffix.to_ascii_lowercase()),
                None => HostMatch::Exact(h.to_ascii_lowercase()),
            },
        }
    }

    /// `host` is the request's host, lower-cased and without a port.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h == host,
            HostMatch::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .and_then(|label| label.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        }
    }

    /// Lower ranks are tried first.
    fn rank(&self) -> u8 {
        match self {
            HostMatch::Exact(_) => 0,
            HostMatch::Wildcard(_) => 1,
            HostMatch::Any => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum PathMatch {
    Exact(String),
    /// Stored without its trailing slash (`/` stays `/`).
    Prefix(String),
}

impl PathMatch {
    /// A `Prefix` rule, normalised: the trailing slash is ignored, as Ingress v1 says.
    pub fn prefix(path: &str) -> PathMatch {
        let trimmed = path.trim_end_matches('/');
        PathMatch::Prefix(if trimmed.is_empty() {
            "/".into()
        } else {
            trimmed.into()
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) if p == "/" => true,
            // Element-wise: the request must continue with `/` (or end) right after the prefix.
            PathMatch::Prefix(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }

    fn path(&self) -> &str {
        match self {
            PathMatch::Exact(p) | PathMatch::Prefix(p) => p,
        }
    }

    /// Longer paths first; for the same path, Exact first.
    fn precedence(&self) -> (std::cmp::Reverse<usize>, u8) {
        let kind = match self {
            PathMatch::Exact(_) => 0,
            PathMatch::Prefix(_) => 1,
        };
        (std::cmp::Reverse(self.path().len()), kind)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathRoute {
    pub path: PathMatch,
    /// The name of the backend pool that serves it.
    pub backend: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRoutes {
    pub host: HostMatch,
    pub paths: Vec<PathRoute>,
}

/// Every route of an L7 load balancer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTable {
    pub hosts: Vec<HostRoutes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_backend: Option<String>,
}

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    Backend(&'a str),
    NotFound,
}

impl RouteTable {
    /// Merges rules of the same host (as several Ingress rules, or several Ingresses, may give
    /// them) and orders everything by precedence, so [`RouteTable::resolve`] can stop at the
    /// first match. Among equal paths the first given wins, so merging stays deterministic.
    pub fn normalized(mut self) -> RouteTable {
        let mut merged: Vec<HostRoutes> = Vec::new();
        for group in self.hosts.drain(..) {
            match merged.iter_mut().find(|g| g.host == group.host) {
                Some(existing) => existing.paths.extend(group.paths),
                None => merged.push(group),
            }
        }
        for group in &mut merged {
            group.paths.sort_by_key(|p| p.path.precedence());
            group.paths.dedup_by(|b, a| a.path == b.path);
        }
        merged.sort_by_key(|g| g.host.rank());
        RouteTable {
            hosts: merged,
            default_backend: self.default_backend,
        }
    }

    /// The backend for a request, given its `Host` (any case, port allowed) and its path (no
    /// query). Expects a [`RouteTable::normalized`] table.
    pub fn resolve(&self, host: &str, path: &str) -> Decision<'_> {
        let host = normalize_host(host);
        let fallback = || match &self.default_backend {
            Some(b) => Decision::Backend(b),
            None => Decision::NotFound,
        };
        let Some(group) = self.hosts.iter().find(|g| g.host.matches(&host)) else {
            return fallback();
        };
        match group.paths.iter().find(|p| p.path.matches(path)) {
            Some(route) => Decision::Backend(&route.backend),
            None => fallback(),
        }
    }
}

/// Lower-cases and strips a port (`Example.com:8080` → `example.com`, `[::1]:80` → `[::1]`).
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        host.split_once(']')
            .map(|(h, _)| format!("{h}]"))
            .unwrap_or_else(|| host.to_string())
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map(|(h, _)| h.to_string())
            .unwrap_or_else(|| host.to_string())
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: PathMatch, backend: &str) -> PathRoute {
        PathRoute {
            path,
            backend: backend.into(),
        }
    }

    fn exact(p: &str) -> PathMatch {
        PathMatch::Exact(p.into())
    }

    fn table(hosts: Vec<(Option<&str>, Vec<PathRoute>)>, default: Option<&str>) -> RouteTable {
        RouteTable {
            hosts: hosts
                .into_iter()
                .map(|(h, paths)| HostRoutes {
                    host: HostMatch::parse(h),
                    paths,
                })
                .collect(),
            default_backend: default.map(Into::into),
        }
        .normalized()
    }

    fn backend<'a>(t: &'a RouteTable, host: &str, path: &str) -> Option<&'a str> {
        match t.resolve(host, path) {
            Decision::Backend(b) => Some(b),
            Decision::NotFound => None,
        }
    }

    #[test]
    fn exact_is_case_sensitive_and_whole_path() {
        let t = table(vec![(None, vec![route(exact("/foo"), "a")])], None);
        assert_eq!(backend(&t, "x", "/foo"), Some("a"));
        assert_eq!(backend(&t, "x", "/foo/"), None, "trailing slash differs");
        assert_eq!(backend(&t, "x", "/FOO"), None, "case differs");
        assert_eq!(backend(&t, "x", "/foo/bar"), None);
    }

    #[test]
    fn prefix_matches_element_wise() {
        let t = table(
            vec![(None, vec![route(PathMatch::prefix("/foo/bar"), "a")])],
            None,
        );
        assert_eq!(backend(&t, "x", "/foo/bar"), Some("a"));
        assert_eq!(backend(&t, "x", "/foo/bar/"), Some("a"));
        assert_eq!(backend(&t, "x", "/foo/bar/baz"), Some("a"));
        assert_eq!(backend(&t, "x", "/foo/barbaz"), None);
        assert_eq!(backend(&t, "x", "/foo"), None);
        assert_eq!(backend(&t, "x", "/Foo/bar"), None, "case-sensitive");
    }

    #[test]
    fn a_trailing_slash_in_a_prefix_rule_is_ignored() {
        let t = table(
            vec![(None, vec![route(PathMatch::prefix("/foo/"), "a")])],
            None,
        );
        assert_eq!(backend(&t, "x", "/foo"), Some("a"));
        assert_eq!(backend(&t, "x", "/foo/"), Some("a"));
        assert_eq!(backend(&t, "x", "/foobar"), None);
    }

    #[test]
    fn prefix_slash_matches_everything() {
        let t = table(
            vec![(None, vec![route(PathMatch::prefix("/"), "root")])],
            None,
        );
        assert_eq!(backend(&t, "x", "/"), Some("root"));
        assert_eq!(backend(&t, "x", "/anything/at/all"), Some("root"));
    }

    #[test]
    fn the_longest_match_wins_and_exact_beats_prefix_for_the_same_path() {
        let t = table(
            vec![(
                None,
                vec![
                    route(PathMatch::prefix("/"), "root"),
                    route(PathMatch::prefix("/aaa"), "prefix-aaa"),
                    route(PathMatch::prefix("/aaa/bbb"), "prefix-bbb"),
                    route(exact("/aaa"), "exact-aaa"),
                ],
            )],
            None,
        );
        assert_eq!(backend(&t, "x", "/aaa"), Some("exact-aaa"));
        assert_eq!(backend(&t, "x", "/aaa/"), Some("prefix-aaa"));
        assert_eq!(backend(&t, "x", "/aaa/bbb/c"), Some("prefix-bbb"));
        assert_eq!(
            backend(&t, "x", "/aaaccc"),
            Some("root"),
            "/aaa must not match /aaaccc"
        );
    }

    #[test]
    fn wildcard_hosts_match_exactly_one_label() {
        let t = table(
            vec![(Some("*.foo.com"), vec![route(PathMatch::prefix("/"), "w")])],
            None,
        );
        assert_eq!(backend(&t, "bar.foo.com", "/"), Some("w"));
        assert_eq!(backend(&t, "BAR.Foo.com:8080", "/"), Some("w"));
        assert_eq!(backend(&t, "baz.bar.foo.com", "/"), None, "two labels");
        assert_eq!(backend(&t, "foo.com", "/"), None, "no label");
        assert_eq!(backend(&t, "xfoo.com", "/"), None);
    }

    #[test]
    fn exact_hosts_win_over_wildcards_and_wildcards_over_any() {
        let t = table(
            vec![
                (None, vec![route(PathMatch::prefix("/"), "any")]),
                (
                    Some("*.foo.com"),
                    vec![route(PathMatch::prefix("/"), "wild")],
                ),
                (
                    Some("bar.foo.com"),
                    vec![route(PathMatch::prefix("/"), "exact")],
                ),
            ],
            None,
        );
        assert_eq!(backend(&t, "bar.foo.com", "/"), Some("exact"));
        assert_eq!(backend(&t, "baz.foo.com", "/"), Some("wild"));
        assert_eq!(backend(&t, "other.org", "/"), Some("any"));
    }

    #[test]
    fn unmatched_requests_go_to_the_default_backend_else_404() {
        let rules = vec![(Some("a.example"), vec![route(exact("/only"), "a")])];
        let with_default = table(rules.clone(), Some("fallback"));
        assert_eq!(
            backend(&with_default, "a.example", "/other"),
            Some("fallback")
        );
        assert_eq!(
            backend(&with_default, "b.example", "/only"),
            Some("fallback")
        );
        let without = table(rules, None);
        assert_eq!(without.resolve("b.example", "/only"), Decision::NotFound);
    }

    #[test]
    fn no_rules_send_everything_to_the_default_backend() {
        let t = table(vec![], Some("d"));
        assert_eq!(backend(&t, "any.host", "/any/path"), Some("d"));
    }

    #[test]
    fn rules_for_one_host_from_several_sources_are_merged_deterministically() {
        let t = table(
            vec![
                (Some("h"), vec![route(PathMatch::prefix("/a"), "first")]),
                (
                    Some("h"),
                    vec![
                        route(PathMatch::prefix("/a"), "second"),
                        route(exact("/b"), "b"),
                    ],
                ),
            ],
            None,
        );
        assert_eq!(t.hosts.len(), 1);
        assert_eq!(
            backend(&t, "h", "/a/x"),
            Some("first"),
            "the first definition wins"
        );
        assert_eq!(backend(&t, "h", "/b"), Some("b"));
    }

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(normalize_host("Example.COM:443"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
    }
}
