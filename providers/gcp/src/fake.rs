//! A fake of the Compute Engine REST endpoints the provider calls, for tests: there is no
//! Compute Engine emulator. It keeps state and answers the way the API documents: a resource
//! by name (404 when missing), insert (409 when it exists, 400 when it names a missing
//! resource), delete (400 `resourceInUseByAnotherResource` while another resource points at
//! it), patch, update, the target pools' instance and health-check verbs, and operations that report
//! `RUNNING` for a few polls before `DONE`. Served on a free 127.0.0.1 port, stopped when
//! dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::names::API;

#[derive(Default)]
struct State {
    /// Resources by collection path (`projects/p/regions/r/targetPools`), then by name.
    collections: BTreeMap<String, BTreeMap<String, Value>>,
    /// Operations by path, with the polls left before they report `DONE`.
    operations: HashMap<String, (Value, u32)>,
    polls_before_done: u32,
    next_id: u64,
    /// Mutations made, as `METHOD collection[/verb]`.
    changes: Vec<String>,
    /// Refuse every mutation after this many, as if the reconcile were killed there.
    changes_allowed: Option<usize>,
    /// One-shot failures: (path fragment, status, reason).
    failures: VecDeque<(String, u16, String)>,
    /// Network endpoints by endpoint group path.
    endpoints: HashMap<String, Vec<Value>>,
}

pub struct FakeCompute {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeCompute {
    /// Starts the fake; its operations finish after `polls_before_done` polls.
    pub async fn start(polls_before_done: u32) -> FakeCompute {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("a free loopback port");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            polls_before_done,
            next_id: 1000,
            ..State::default()
        }));
        let shared = state.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeCompute {
            addr,
            state,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The mutations made since the last call.
    pub fn take_changes(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().unwrap().changes)
    }

    /// Refuse (503) every mutation after `n` more.
    pub fn kill_after(&self, n: Option<usize>) {
        let mut state = self.state.lock().unwrap();
        state.changes_allowed = n.map(|n| state.changes.len() + n);
    }

    /// The next request whose path contains `fragment` fails with `status` and `reason`.
    pub fn fail_next(&self, fragment: &str, status: u16, reason: &str) {
        self.state.lock().unwrap().failures.push_back((
            fragment.to_string(),
            status,
            reason.to_string(),
        ));
    }

    /// The names in a collection (`regions/r/targetPools`, `global/firewalls`) of project `p`.
    pub fn names(&self, project: &str, collection: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .collections
            .get(&format!("projects/{project}/{collection}"))
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every resource held, by collection.
    pub fn count(&self) -> usize {
        let state = self.state.lock().unwrap();
        state.collections.values().map(BTreeMap::len).sum()
    }

    pub fn resource(&self, project: &str, collection: &str, name: &str) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state
            .collections
            .get(&format!("projects/{project}/{collection}"))?
            .get(name)
            .cloned()
    }

    /// Puts a resource in place as someone else would have (a test's foreign resource).
    pub fn put(&self, project: &str, collection: &str, mut resource: Value) {
        let path = format!("projects/{project}/{collection}");
        let name = resource["name"].as_str().unwrap().to_string();
        resource["selfLink"] = json!(format!("{API}/{path}/{name}"));
        let mut state = self.state.lock().unwrap();
        state
            .collections
            .entry(path)
            .or_default()
            .insert(name, resource);
    }
}

impl Drop for FakeCompute {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn error(status: u16, reason: &str, message: &str) -> Response<Full<Bytes>> {
    reply(
        StatusCode::from_u16(status).unwrap(),
        json!({"error": {"code": status, "message": message,
                         "errors": [{"message": message, "domain": "global", "reason": reason}]}}),
    )
}

/// The API's refusal of a resource it would not take, beyond missing references.
fn invalid(collection: &str, resource: &Value) -> Option<Response<Full<Bytes>>> {
    (collection == "sslPolicies"
        && resource["minTlsVersion"] == "TLS_1_3"
        && resource["profile"] != "RESTRICTED")
        .then(|| {
            error(
                400,
                "invalid",
                "When minTlsVersion is TLS_1_3, the profile must be RESTRICTED",
            )
        })
}

/// The API's 404 for the resource at `link`.
fn missing(link: &str) -> Response<Full<Bytes>> {
    error(
        404,
        "notFound",
        &format!("The resource '{link}' was not found"),
    )
}

/// A link's path after `compute/v1/`, which is how resources are keyed.
fn key_of(link: &str) -> &str {
    link.split_once("compute/v1/")
        .map_or(link, |(_, rest)| rest)
}

async fn handle(state: &Mutex<State>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut state = state.lock().unwrap();
    let Some(rest) = path.strip_prefix("/compute/v1/") else {
        return error(404, "notFound", "unknown path");
    };
    if let Some(i) = state
        .failures
        .iter()
        .position(|(f, ..)| rest.contains(f.as_str()))
    {
        let (_, status, reason) = state.failures.remove(i).unwrap();
        return error(status, &reason, &format!("injected {reason}"));
    }
    // A few verbs of global resources have no `global/` in their path
    // (`projects/{p}/targetHttpProxies/{name}/setUrlMap`).
    let rest = match rest.split('/').nth(2) {
        Some("targetHttpProxies" | "targetHttpsProxies") => {
            let (project, tail) = rest.split_at(rest.match_indices('/').nth(1).unwrap().0);
            format!("{project}/global{tail}")
        }
        _ => rest.to_string(),
    };
    let rest = rest.as_str();
    let segments: Vec<&str> = rest.split('/').collect();
    if segments.get(2) == Some(&"aggregated") && method == Method::GET {
        return aggregated(
            &state,
            segments[1],
            segments.get(3).copied().unwrap_or_default(),
        );
    }
    // projects/{p}/regions/{r}/{collection}/..., .../zones/{z}/... or projects/{p}/global/...
    let scope_len = match segments.get(2) {
        Some(&"regions") | Some(&"zones") => 4,
        Some(&"global") => 3,
        _ => return error(404, "notFound", "unknown scope"),
    };
    if segments.len() <= scope_len {
        return error(404, "notFound", "no collection");
    }
    let collection_path = segments[..=scope_len].join("/");
    let collection = segments[scope_len];
    let name = segments.get(scope_len + 1).copied();
    let verb = segments.get(scope_len + 2).copied();

    if collection == "operations" {
        let Some(name) = name else {
            return error(404, "notFound", "no operation");
        };
        let key = format!("{collection_path}/{name}");
        let Some((op, left)) = state.operations.get_mut(&key) else {
            return error(404, "notFound", &format!("operation {name} not found"));
        };
        if *left == 0 {
            op["status"] = json!("DONE");
        } else {
            *left -= 1;
        }
        return reply(StatusCode::OK, op.clone());
    }

    // Listing endpoints is a POST that changes nothing.
    let mutation = method != Method::GET && verb != Some("listNetworkEndpoints");
    if mutation {
        let change = format!(
            "{method} {collection}{}",
            verb.map(|v| format!("/{v}")).unwrap_or_default()
        );
        if state
            .changes_allowed
            .is_some_and(|allowed| state.changes.len() >= allowed)
        {
            return error(503, "backendError", "the reconcile was killed here");
        }
        state.changes.push(change);
    }

    let link = |name: &str| format!("{API}/{collection_path}/{name}");
    match (&method, name, verb) {
        (&Method::GET, None, None) => {
            let items: Vec<Value> = state
                .collections
                .get(&collection_path)
                .map(|c| c.values().cloned().collect())
                .unwrap_or_default();
            reply(StatusCode::OK, json!({"items": items}))
        }
        (&Method::GET, Some(name), None) => {
            match state
                .collections
                .get(&collection_path)
                .and_then(|c| c.get(name))
            {
                Some(r) => reply(StatusCode::OK, r.clone()),
                None => missing(&link(name)),
            }
        }
        (&Method::POST, None, None) => {
            let Some(name) = body["name"].as_str().map(String::from) else {
                return error(400, "invalid", "a resource needs a name");
            };
            if state
                .collections
                .get(&collection_path)
                .is_some_and(|c| c.contains_key(&name))
            {
                return error(
                    409,
                    "alreadyExists",
                    &format!("The resource '{}' already exists", link(&name)),
                );
            }
            if let Some(refused) = invalid(collection, &body) {
                return refused;
            }
            let mut resource = body.clone();
            for reference in references(&resource) {
                if !exists(&state, &reference) {
                    return error(
                        400,
                        "invalid",
                        &format!("The resource '{reference}' was not found"),
                    );
                }
            }
            state.next_id += 1;
            resource["id"] = json!(state.next_id.to_string());
            resource["selfLink"] = json!(link(&name));
            resource["creationTimestamp"] = json!("2026-12-02T00:00:00.000-00:00");
            if collection == "addresses" && resource.get("address").is_none() {
                // TEST-NET-2: reported, never dialed.
                resource["address"] = json!(format!("198.51.100.{}", state.next_id % 250 + 1));
                resource["status"] = json!("RESERVED");
            }
            if collection == "forwardingRules" && resource.get("IPAddress").is_none() {
                resource["IPAddress"] = json!(format!("198.51.100.{}", state.next_id % 250 + 1));
            }
            state
                .collections
                .entry(collection_path.clone())
                .or_default()
                .insert(name.clone(), resource);
            operation(&mut state, &segments[..scope_len], "insert", &link(&name))
        }
        (&Method::DELETE, Some(name), None) => {
            let target = link(name);
            if !state
                .collections
                .get(&collection_path)
                .is_some_and(|c| c.contains_key(name))
            {
                return missing(&target);
            }
            let users: Vec<String> = state
                .collections
                .values()
                .flat_map(|c| c.values())
                .filter(|r| references(r).iter().any(|l| key_of(l) == key_of(&target)))
                .filter_map(|r| r["selfLink"].as_str().map(String::from))
                .collect();
            if let Some(user) = users.first() {
                return error(
                    400,
                    "resourceInUseByAnotherResource",
                    &format!("The resource '{target}' is already being used by '{user}'"),
                );
            }
            state
                .collections
                .get_mut(&collection_path)
                .unwrap()
                .remove(name);
            state.endpoints.remove(&format!("{collection_path}/{name}"));
            operation(&mut state, &segments[..scope_len], "delete", &target)
        }
        (&Method::PATCH, Some(name), None) => {
            let target = link(name);
            let Some(resource) = state
                .collections
                .get_mut(&collection_path)
                .and_then(|c| c.get_mut(name))
            else {
                return missing(&target);
            };
            let mut merged = resource.clone();
            if let (Value::Object(into), Value::Object(from)) = (&mut merged, &body) {
                into.extend(from.clone());
            }
            if let Some(refused) = invalid(collection, &merged) {
                return refused;
            }
            if let (Value::Object(into), Value::Object(from)) = (resource, &body) {
                for (k, v) in from {
                    if !matches!(k.as_str(), "name" | "selfLink" | "id") {
                        into.insert(k.clone(), v.clone());
                    }
                }
            }
            operation(&mut state, &segments[..scope_len], "patch", &target)
        }
        (&Method::PUT, Some(name), None) => {
            let target = link(name);
            let Some(resource) = state
                .collections
                .get_mut(&collection_path)
                .and_then(|c| c.get_mut(name))
            else {
                return missing(&target);
            };
            let mut replaced = body.clone();
            for kept in ["name", "selfLink", "id", "creationTimestamp"] {
                replaced[kept] = resource[kept].clone();
            }
            *resource = replaced;
            operation(&mut state, &segments[..scope_len], "update", &target)
        }
        (&Method::POST, Some(name), Some(verb)) if collection == "targetPools" => {
            let target = link(name);
            let (field, item, adding) = match verb {
                "addInstance" => ("instances", "instance", true),
                "removeInstance" => ("instances", "instance", false),
                "addHealthCheck" => ("healthChecks", "healthCheck", true),
                "removeHealthCheck" => ("healthChecks", "healthCheck", false),
                _ => return error(400, "invalid", &format!("unknown verb {verb}")),
            };
            let links: Vec<String> = body[field]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r[item].as_str().map(String::from))
                .collect();
            if field == "healthChecks"
                && adding
                && let Some(missing) = links.iter().find(|l| !exists(&state, l))
            {
                return error(
                    400,
                    "invalid",
                    &format!("The resource '{missing}' was not found"),
                );
            }
            let Some(pool) = state
                .collections
                .get_mut(&collection_path)
                .and_then(|c| c.get_mut(name))
            else {
                return missing(&target);
            };
            let mut current: Vec<String> = pool[field]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            for l in links {
                if adding && !current.contains(&l) {
                    current.push(l);
                } else if !adding {
                    current.retain(|c| key_of(c) != key_of(&l));
                }
            }
            pool[field] = json!(current);
            operation(&mut state, &segments[..scope_len], verb, &target)
        }
        (&Method::POST, Some(name), Some(verb)) if collection == "networkEndpointGroups" => {
            let target = link(name);
            let key = format!("{collection_path}/{name}");
            if !state
                .collections
                .get(&collection_path)
                .is_some_and(|c| c.contains_key(name))
            {
                return missing(&target);
            }
            let given: Vec<Value> = body["networkEndpoints"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let current = state.endpoints.entry(key).or_default();
            match verb {
                "listNetworkEndpoints" => {
                    let items: Vec<Value> = current
                        .iter()
                        .map(|e| json!({"networkEndpoint": e, "healths": []}))
                        .collect();
                    return reply(StatusCode::OK, json!({"items": items}));
                }
                "attachNetworkEndpoints" => {
                    for e in given {
                        if !current.contains(&e) {
                            current.push(e);
                        }
                    }
                }
                "detachNetworkEndpoints" => current.retain(|e| !given.contains(e)),
                _ => return error(400, "invalid", &format!("unknown verb {verb}")),
            }
            operation(&mut state, &segments[..scope_len], verb, &target)
        }
        (&Method::POST, Some(name), Some(verb))
            if matches!(
                verb,
                "setUrlMap" | "setSslCertificates" | "setSslPolicy" | "setTarget"
            ) =>
        {
            let target = link(name);
            let field = match verb {
                "setUrlMap" => "urlMap",
                "setSslCertificates" => "sslCertificates",
                "setSslPolicy" => "sslPolicy",
                _ => "target",
            };
            let value = body[field].clone();
            let probe = json!({ field: value.clone() });
            if let Some(missing) = references(&probe).iter().find(|l| !exists(&state, l)) {
                return error(
                    400,
                    "invalid",
                    &format!("The resource '{missing}' was not found"),
                );
            }
            let Some(resource) = state
                .collections
                .get_mut(&collection_path)
                .and_then(|c| c.get_mut(name))
            else {
                return missing(&target);
            };
            resource[field] = value;
            operation(&mut state, &segments[..scope_len], verb, &target)
        }
        _ => error(400, "invalid", &format!("{method} {rest} is not served")),
    }
}

/// `GET projects/{p}/aggregated/{collection}`: the collection in every zone and region.
fn aggregated(state: &State, project: &str, collection: &str) -> Response<Full<Bytes>> {
    let mut items = serde_json::Map::new();
    let prefix = format!("projects/{project}/");
    for (path, resources) in &state.collections {
        let Some(scope) = path
            .strip_prefix(&prefix)
            .and_then(|p| p.strip_suffix(&format!("/{collection}")))
        else {
            continue;
        };
        items.insert(
            scope.to_string(),
            json!({ collection: resources.values().cloned().collect::<Vec<_>>() }),
        );
    }
    reply(StatusCode::OK, json!({"items": items}))
}

/// The links to other Compute resources a resource holds (its own `selfLink` aside).
fn references(resource: &Value) -> Vec<String> {
    let mut links = Vec::new();
    let mut one = |v: &Value| {
        if let Some(l) = v.as_str() {
            links.push(l.to_string());
        }
    };
    for field in ["target", "urlMap", "defaultService", "sslPolicy"] {
        one(&resource[field]);
    }
    for field in ["healthChecks", "sslCertificates"] {
        resource[field]
            .as_array()
            .into_iter()
            .flatten()
            .for_each(&mut one);
    }
    for b in resource["backends"].as_array().into_iter().flatten() {
        one(&b["group"]);
    }
    for m in resource["pathMatchers"].as_array().into_iter().flatten() {
        one(&m["defaultService"]);
        for r in m["pathRules"].as_array().into_iter().flatten() {
            one(&r["service"]);
        }
    }
    links
}

fn exists(state: &State, link: &str) -> bool {
    let key = key_of(link);
    let Some((collection, name)) = key.rsplit_once('/') else {
        return false;
    };
    state
        .collections
        .get(collection)
        .is_some_and(|c| c.contains_key(name))
}

/// A new operation in `scope` (`projects/p/regions/r` or `projects/p/global`) on `target`.
fn operation(state: &mut State, scope: &[&str], kind: &str, target: &str) -> Response<Full<Bytes>> {
    state.next_id += 1;
    let name = format!("operation-{}", state.next_id);
    let path = format!("{}/operations/{name}", scope.join("/"));
    let left = state.polls_before_done;
    let op = json!({
        "kind": "compute#operation",
        "name": name,
        "operationType": kind,
        "targetLink": target,
        "status": if left == 0 { "DONE" } else { "RUNNING" },
        "selfLink": format!("{API}/{path}"),
    });
    state.operations.insert(path, (op.clone(), left));
    reply(StatusCode::OK, op)
}
