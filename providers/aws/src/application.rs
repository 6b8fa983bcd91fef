//! Ingress routing as ALB listener rules, computed by pure code: rules in priority order that
//! reproduce Ingress v1 precedence, and the listener's default action.
//!
//! - A rule's host is a `host-header` condition; its paths are `path-pattern` values:
//!   `Exact /x` is `/x`, `Prefix /x` is `/x` and `/x/*` (element-wise), `Prefix /` is `/*`.
//! - Exact hosts come first, then wildcards, then rules for any host; within a host, longer
//!   paths first and `Exact` before `Prefix` for the same path (see
//!   [`RouteTable::normalized`]).
//! - After a host's paths, a rule for that host alone sends whatever they missed to the
//!   default backend (or 404): in Ingress a request whose host matched never falls through to
//!   a less specific host's rules, while ALB would try the next rule.
//!
//! Not expressible on ALB, and refused: a path containing `*` or `?` (ALB's wildcards).
//! ALB's `*` in a host also matches several labels, where Ingress's matches exactly one.

use portico_provider::routing::{HostMatch, PathMatch, RouteTable};

/// What a rule (or the listener's default) does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleAction {
    /// Forward to the target group of this backend.
    Forward(String),
    /// A fixed `404`: no rule and no default backend.
    NotFound,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulePlan {
    /// 1 is tried first.
    pub priority: i32,
    /// The `host-header` value; `None` for any host.
    pub host: Option<String>,
    /// `path-pattern` values (one rule holds at most the five ALB allows); empty for any path.
    pub paths: Vec<String>,
    pub action: RuleAction,
}

/// The rules and default action for `routes`.
pub fn rules(routes: &RouteTable) -> Result<(Vec<RulePlan>, RuleAction), String> {
    let routes = routes.clone().normalized();
    let default = match &routes.default_backend {
        Some(b) => RuleAction::Forward(b.clone()),
        None => RuleAction::NotFound,
    };
    let mut rules = Vec::new();
    let mut next = 1;
    let mut push = |host: Option<String>, paths: Vec<String>, action: RuleAction| {
        rules.push(RulePlan {
            priority: next,
            host,
            paths,
            action,
        });
        next += 1;
    };
    for group in &routes.hosts {
        let host = match &group.host {
            HostMatch::Any => None,
            HostMatch::Exact(h) => Some(h.clone()),
            HostMatch::Wildcard(suffix) => Some(format!("*.{suffix}")),
        };
        for route in &group.paths {
            push(
                host.clone(),
                patterns(&route.path)?,
                RuleAction::Forward(route.backend.clone()),
            );
        }
        // What this host's paths miss goes to the default, not to a less specific host.
        if host.is_some() {
            push(host.clone(), Vec::new(), default.clone());
        }
    }
    Ok((rules, default))
}

fn patterns(path: &PathMatch) -> Result<Vec<String>, String> {
    let (PathMatch::Exact(p) | PathMatch::Prefix(p)) = path;
    if p.contains(['*', '?']) {
        return Err(format!(
            "path {p:?} contains * or ?, which ALB path patterns treat as wildcards"
        ));
    }
    Ok(match path {
        PathMatch::Exact(p) => vec![p.clone()],
        PathMatch::Prefix(p) if p == "/" => vec!["/*".into()],
        PathMatch::Prefix(p) => vec![p.clone(), format!("{p}/*")],
    })
}

#[cfg(test)]
mod tests {
    use portico_provider::routing::{Decision, HostRoutes, PathRoute};

    use super::*;

    fn route(path: PathMatch, backend: &str) -> PathRoute {
        PathRoute {
            path,
            backend: backend.into(),
        }
    }

    fn table(default: Option<&str>) -> RouteTable {
        RouteTable {
            hosts: vec![
                HostRoutes {
                    host: HostMatch::Any,
                    paths: vec![route(PathMatch::prefix("/"), "any-root")],
                },
                HostRoutes {
                    host: HostMatch::parse(Some("*.example.com")),
                    paths: vec![route(PathMatch::prefix("/"), "wild")],
                },
                HostRoutes {
                    host: HostMatch::parse(Some("shop.example.com")),
                    paths: vec![
                        route(PathMatch::prefix("/api"), "api"),
                        route(PathMatch::Exact("/api".into()), "api-exact"),
                        route(PathMatch::prefix("/api/v2/"), "api-v2"),
                    ],
                },
            ],
            default_backend: default.map(String::from),
        }
    }

    /// ALB's glob: `*` any run of characters, `?` one character.
    fn glob(pattern: &str, text: &str) -> bool {
        match pattern.chars().next() {
            None => text.is_empty(),
            Some('*') => (0..=text.len())
                .filter(|i| text.is_char_boundary(*i))
                .any(|i| glob(&pattern[1..], &text[i..])),
            Some('?') => {
                let mut chars = text.chars();
                chars.next().is_some() && glob(&pattern[1..], chars.as_str())
            }
            Some(c) => text.starts_with(c) && glob(&pattern[c.len_utf8()..], &text[c.len_utf8()..]),
        }
    }

    /// What an ALB does with these rules: the first by priority whose conditions all match.
    fn alb(rules: &[RulePlan], default: &RuleAction, host: &str, path: &str) -> Option<String> {
        let matched = rules.iter().find(|r| {
            r.host.as_ref().is_none_or(|h| glob(h, host))
                && (r.paths.is_empty() || r.paths.iter().any(|p| glob(p, path)))
        });
        match matched.map_or(default, |r| &r.action) {
            RuleAction::Forward(b) => Some(b.clone()),
            RuleAction::NotFound => None,
        }
    }

    #[test]
    fn the_rules_route_every_request_as_the_ingress_does() {
        for default in [None, Some("fallback")] {
            let routes = table(default);
            let (rules, default_action) = rules(&routes).unwrap();
            let normalized = routes.clone().normalized();
            for host in ["shop.example.com", "blog.example.com", "other.test"] {
                for path in [
                    "/",
                    "/api",
                    "/api/",
                    "/api/x",
                    "/apix",
                    "/api/v2",
                    "/api/v2/y",
                    "/api/v22",
                    "/static/a.css",
                ] {
                    let ingress = match normalized.resolve(host, path) {
                        Decision::Backend(b) => Some(b.to_string()),
                        Decision::NotFound => None,
                    };
                    assert_eq!(
                        alb(&rules, &default_action, host, path),
                        ingress,
                        "{host}{path} with default {default:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn priorities_follow_ingress_precedence_and_prefixes_are_element_wise() {
        let (rules, default) = rules(&table(None)).unwrap();
        let summary: Vec<(i32, Option<&str>, Vec<&str>)> = rules
            .iter()
            .map(|r| {
                (
                    r.priority,
                    r.host.as_deref(),
                    r.paths.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        let shop = Some("shop.example.com");
        let wild = Some("*.example.com");
        assert_eq!(
            summary,
            vec![
                (1, shop, vec!["/api/v2", "/api/v2/*"]),
                (2, shop, vec!["/api"]),
                (3, shop, vec!["/api", "/api/*"]),
                (4, shop, vec![]),
                (5, wild, vec!["/*"]),
                (6, wild, vec![]),
                (7, None, vec!["/*"]),
            ]
        );
        assert_eq!(rules[1].action, RuleAction::Forward("api-exact".into()));
        assert_eq!(
            rules[3].action,
            RuleAction::NotFound,
            "shop's misses get 404"
        );
        assert_eq!(default, RuleAction::NotFound);
    }

    #[test]
    fn paths_with_alb_wildcards_are_refused() {
        let routes = RouteTable {
            hosts: vec![HostRoutes {
                host: HostMatch::Any,
                paths: vec![route(PathMatch::Exact("/a*b".into()), "x")],
            }],
            default_backend: None,
        };
        assert!(rules(&routes).unwrap_err().contains("wildcards"));
    }
}
