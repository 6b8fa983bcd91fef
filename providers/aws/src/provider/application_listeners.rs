//! Applying an [`ApplicationPlan`] to an ALB: listeners (HTTP, and HTTPS with its
//! certificates and TLS policy), their rules by priority, and the load balancer's attributes.
//! Each is read first and changed only where it differs; target groups no rule uses any more
//! are deleted last, once nothing points at them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, Certificate as AwsCertificate, FixedResponseActionConfig,
    HostHeaderConditionConfig, Listener as AwsListener, LoadBalancerAttribute,
    PathPatternConditionConfig, ProtocolEnum, RedirectActionConfig, RedirectActionStatusCodeEnum,
    Rule, RuleCondition,
};
use portico_provider::ProviderError;

use super::AwsProvider;
use crate::application::{ApplicationPlan, HttpsPlan, RuleAction, RulePlan};
use crate::error::from_sdk;

/// What a listener or rule does, as far as Portico sets it: the unit of comparison between
/// what exists and what is planned.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Does {
    Forward(String),
    Fixed(String),
    Redirect(String),
    Other,
}

impl Does {
    fn of(actions: &[Action]) -> Does {
        match actions.first() {
            Some(a) if a.r#type() == Some(&ActionTypeEnum::Forward) => {
                let arn = a.target_group_arn().map(String::from).or_else(|| {
                    a.forward_config()
                        .and_then(|f| f.target_groups().first())
                        .and_then(|t| t.target_group_arn())
                        .map(String::from)
                });
                arn.map_or(Does::Other, Does::Forward)
            }
            Some(a) if a.r#type() == Some(&ActionTypeEnum::FixedResponse) => Does::Fixed(
                a.fixed_response_config()
                    .and_then(|f| f.status_code())
                    .map(String::from)
                    .unwrap_or_default(),
            ),
            Some(a) if a.r#type() == Some(&ActionTypeEnum::Redirect) => Does::Redirect(
                a.redirect_config()
                    .and_then(|r| r.port())
                    .unwrap_or_default()
                    .to_string(),
            ),
            _ => Does::Other,
        }
    }

    fn action(&self) -> Action {
        match self {
            Does::Forward(arn) => Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(arn)
                .build(),
            Does::Fixed(code) => Action::builder()
                .r#type(ActionTypeEnum::FixedResponse)
                .fixed_response_config(
                    FixedResponseActionConfig::builder()
                        .status_code(code)
                        .content_type("text/plain")
                        .message_body("not found\n")
                        .build(),
                )
                .build(),
            Does::Redirect(port) => Action::builder()
                .r#type(ActionTypeEnum::Redirect)
                .redirect_config(
                    RedirectActionConfig::builder()
                        .protocol("HTTPS")
                        .port(port)
                        .host("#{host}")
                        .path("/#{path}")
                        .query("#{query}")
                        .status_code(RedirectActionStatusCodeEnum::Http301)
                        .build(),
                )
                .build(),
            Does::Other => unreachable!("never planned"),
        }
    }
}

/// A rule's conditions as Portico writes them: a host, path patterns.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Matches {
    host: Option<String>,
    paths: Vec<String>,
}

impl Matches {
    fn of(rule: &Rule) -> Matches {
        let mut host = None;
        let mut paths = Vec::new();
        for c in rule.conditions() {
            match c.field() {
                Some("host-header") => {
                    host = c
                        .host_header_config()
                        .map(|h| h.values())
                        .filter(|v| !v.is_empty())
                        .unwrap_or(c.values())
                        .first()
                        .map(|h| h.to_ascii_lowercase());
                }
                Some("path-pattern") => {
                    paths = c
                        .path_pattern_config()
                        .map(|p| p.values())
                        .filter(|v| !v.is_empty())
                        .unwrap_or(c.values())
                        .to_vec();
                }
                // A condition Portico never writes: the rule is not as planned.
                _ => paths.push(format!("<{}>", c.field().unwrap_or_default())),
            }
        }
        Matches { host, paths }
    }

    fn of_plan(rule: &RulePlan) -> Matches {
        Matches {
            host: rule.host.as_ref().map(|h| h.to_ascii_lowercase()),
            paths: rule.paths.clone(),
        }
    }

    fn conditions(&self) -> Vec<RuleCondition> {
        let mut conditions = Vec::new();
        if let Some(host) = &self.host {
            conditions.push(
                RuleCondition::builder()
                    .field("host-header")
                    .host_header_config(HostHeaderConditionConfig::builder().values(host).build())
                    .build(),
            );
        }
        if !self.paths.is_empty() {
            conditions.push(
                RuleCondition::builder()
                    .field("path-pattern")
                    .path_pattern_config(
                        PathPatternConditionConfig::builder()
                            .set_values(Some(self.paths.clone()))
                            .build(),
                    )
                    .build(),
            );
        }
        conditions
    }
}

impl AwsProvider {
    /// Listeners, rules and attributes of ALB `lb_arn` as `plan` says, with `groups` the
    /// target group ARN of every backend.
    pub(super) async fn ensure_application_listeners(
        &self,
        lb_arn: &str,
        plan: &ApplicationPlan,
        groups: &HashMap<String, String>,
    ) -> Result<(), ProviderError> {
        let does = |action: &RuleAction| match action {
            RuleAction::Forward(backend) => Does::Forward(groups[backend].clone()),
            RuleAction::NotFound => Does::Fixed("404".into()),
        };
        let routed: Vec<(Matches, Does)> = plan
            .rules
            .iter()
            .map(|r| (Matches::of_plan(r), does(&r.action)))
            .collect();
        let default = does(&plan.default);

        let existing = self.listeners_of(lb_arn).await?;
        let mut used_before = BTreeSet::new();
        let mut kept: HashMap<u16, AwsListener> = HashMap::new();
        for listener in existing {
            let port = listener.port().and_then(|p| u16::try_from(p).ok());
            let protocol = listener.protocol().map(|p| p.as_str().to_string());
            let wanted = match port {
                Some(p) if p == plan.http_port => Some("HTTP"),
                Some(p) if plan.https.as_ref().is_some_and(|h| h.port == p) => Some("HTTPS"),
                _ => None,
            };
            let rules = self
                .rules_of(listener.listener_arn().unwrap_or_default())
                .await?;
            used_before.extend(rules.iter().filter_map(|r| match Does::of(r.actions()) {
                Does::Forward(arn) => Some(arn),
                _ => None,
            }));
            if wanted.is_some() && protocol.as_deref() == wanted {
                kept.insert(port.unwrap_or_default(), listener);
            } else {
                self.delete_listener(listener.listener_arn().unwrap_or_default())
                    .await?;
            }
        }

        let http_default = match plan.redirect_to {
            Some(port) => Does::Redirect(port.to_string()),
            None => default.clone(),
        };
        let http_rules: &[(Matches, Does)] = if plan.redirect_to.is_some() {
            &[]
        } else {
            &routed
        };
        let http = self
            .ensure_listener(
                lb_arn,
                kept.remove(&plan.http_port),
                plan.http_port,
                None,
                &http_default,
            )
            .await?;
        self.ensure_rules(&http, http_rules).await?;
        if let Some(https) = &plan.https {
            let listener = self
                .ensure_listener(
                    lb_arn,
                    kept.remove(&https.port),
                    https.port,
                    Some(https),
                    &default,
                )
                .await?;
            self.ensure_certificates(&listener, https).await?;
            self.ensure_rules(&listener, &routed).await?;
        }
        self.ensure_load_balancer_attributes(lb_arn, &plan.attributes)
            .await?;

        let in_use: BTreeSet<&String> = groups.values().collect();
        for tg in used_before.iter().filter(|tg| !in_use.contains(tg)) {
            self.delete_target_group(tg).await?;
        }
        Ok(())
    }

    /// The listener on `port`, created or brought to its default action, TLS policy and
    /// default certificate; returns its ARN.
    async fn ensure_listener(
        &self,
        lb_arn: &str,
        existing: Option<AwsListener>,
        port: u16,
        https: Option<&HttpsPlan>,
        default: &Does,
    ) -> Result<String, ProviderError> {
        let default_certificate = https
            .and_then(|h| h.certificates.first())
            .map(|arn| AwsCertificate::builder().certificate_arn(arn).build());
        let protocol = if https.is_some() {
            ProtocolEnum::Https
        } else {
            ProtocolEnum::Http
        };
        let Some(listener) = existing else {
            let out = self
                .elb()
                .await
                .create_listener()
                .load_balancer_arn(lb_arn)
                .port(i32::from(port))
                .protocol(protocol)
                .set_ssl_policy(https.map(|h| h.ssl_policy.to_string()))
                .set_certificates(default_certificate.map(|c| vec![c]))
                .default_actions(default.action())
                .send()
                .await
                .map_err(|e| from_sdk("creating a listener", e))?;
            return out
                .listeners()
                .first()
                .and_then(|l| l.listener_arn())
                .map(String::from)
                .ok_or_else(|| ProviderError::Unavailable("CreateListener returned none".into()));
        };
        let arn = listener.listener_arn().unwrap_or_default().to_string();
        let current_certificate = listener
            .certificates()
            .first()
            .and_then(|c| c.certificate_arn());
        let wanted_certificate = https
            .and_then(|h| h.certificates.first())
            .map(String::as_str);
        let policy_differs = https.is_some_and(|h| listener.ssl_policy() != Some(h.ssl_policy));
        let certificate_differs = https.is_some() && current_certificate != wanted_certificate;
        let action_differs = Does::of(listener.default_actions()) != *default;
        if policy_differs || certificate_differs || action_differs {
            self.elb()
                .await
                .modify_listener()
                .listener_arn(&arn)
                .set_ssl_policy(
                    policy_differs
                        .then(|| https.map(|h| h.ssl_policy.to_string()))
                        .flatten(),
                )
                .set_certificates(
                    certificate_differs
                        .then(|| default_certificate.map(|c| vec![c]))
                        .flatten(),
                )
                .set_default_actions(action_differs.then(|| vec![default.action()]))
                .send()
                .await
                .map_err(|e| from_sdk("updating a listener", e))?;
        }
        Ok(arn)
    }

    /// The listener's certificates beyond its default, chosen by SNI: the planned ones added,
    /// others removed.
    async fn ensure_certificates(
        &self,
        listener_arn: &str,
        https: &HttpsPlan,
    ) -> Result<(), ProviderError> {
        let out = self
            .elb()
            .await
            .describe_listener_certificates()
            .listener_arn(listener_arn)
            .send()
            .await
            .map_err(|e| from_sdk("reading listener certificates", e))?;
        let default = https.certificates.first();
        let current: BTreeSet<&str> = out
            .certificates()
            .iter()
            .filter(|c| c.is_default() != Some(true))
            .filter_map(|c| c.certificate_arn())
            .filter(|arn| Some(*arn) != default.map(String::as_str))
            .collect();
        let wanted: BTreeSet<&str> = https
            .certificates
            .iter()
            .skip(1)
            .map(String::as_str)
            .collect();
        let list = |arns: Vec<&&str>| -> Vec<AwsCertificate> {
            arns.into_iter()
                .map(|arn| AwsCertificate::builder().certificate_arn(*arn).build())
                .collect()
        };
        let missing = list(wanted.difference(&current).collect());
        let extra = list(current.difference(&wanted).collect());
        if !missing.is_empty() {
            self.elb()
                .await
                .add_listener_certificates()
                .listener_arn(listener_arn)
                .set_certificates(Some(missing))
                .send()
                .await
                .map_err(|e| from_sdk("adding listener certificates", e))?;
        }
        if !extra.is_empty() {
            self.elb()
                .await
                .remove_listener_certificates()
                .listener_arn(listener_arn)
                .set_certificates(Some(extra))
                .send()
                .await
                .map_err(|e| from_sdk("removing listener certificates", e))?;
        }
        Ok(())
    }

    /// The listener's rules: priority `i + 1` holds `wanted[i]`. A rule already right is left
    /// alone, a wrong one is modified in place (its priority stays taken, so no two rules
    /// ever fight for one), and rules past the end are deleted.
    async fn ensure_rules(
        &self,
        listener_arn: &str,
        wanted: &[(Matches, Does)],
    ) -> Result<(), ProviderError> {
        let mut existing: BTreeMap<usize, Rule> = BTreeMap::new();
        for rule in self.rules_of(listener_arn).await? {
            if rule.is_default() == Some(true) {
                continue;
            }
            match rule.priority().and_then(|p| p.parse::<usize>().ok()) {
                Some(p) if (1..=wanted.len()).contains(&p) => {
                    existing.insert(p, rule);
                }
                _ => {
                    self.delete_rule(rule.rule_arn().unwrap_or_default())
                        .await?
                }
            }
        }
        for (i, (matches, does)) in wanted.iter().enumerate() {
            let priority = i + 1;
            match existing.get(&priority) {
                Some(rule)
                    if Matches::of(rule) == *matches && Does::of(rule.actions()) == *does => {}
                Some(rule) => {
                    self.elb()
                        .await
                        .modify_rule()
                        .rule_arn(rule.rule_arn().unwrap_or_default())
                        .set_conditions(Some(matches.conditions()))
                        .actions(does.action())
                        .send()
                        .await
                        .map_err(|e| from_sdk("updating a listener rule", e))?;
                }
                None => {
                    self.elb()
                        .await
                        .create_rule()
                        .listener_arn(listener_arn)
                        .priority(i32::try_from(priority).unwrap_or(i32::MAX))
                        .set_conditions(Some(matches.conditions()))
                        .actions(does.action())
                        .send()
                        .await
                        .map_err(|e| from_sdk("creating a listener rule", e))?;
                }
            }
        }
        Ok(())
    }

    async fn rules_of(&self, listener_arn: &str) -> Result<Vec<Rule>, ProviderError> {
        let mut rules = Vec::new();
        let mut marker = None;
        loop {
            let out = self
                .elb()
                .await
                .describe_rules()
                .listener_arn(listener_arn)
                .set_marker(marker)
                .send()
                .await
                .map_err(|e| from_sdk("describing listener rules", e))?;
            rules.extend(out.rules().iter().cloned());
            marker = out.next_marker().map(String::from);
            if marker.is_none() {
                return Ok(rules);
            }
        }
    }

    async fn delete_rule(&self, arn: &str) -> Result<(), ProviderError> {
        self.elb()
            .await
            .delete_rule()
            .rule_arn(arn)
            .send()
            .await
            .map_err(|e| from_sdk("deleting a listener rule", e))?;
        Ok(())
    }

    async fn ensure_load_balancer_attributes(
        &self,
        lb_arn: &str,
        wanted: &BTreeMap<&'static str, String>,
    ) -> Result<(), ProviderError> {
        let out = self
            .elb()
            .await
            .describe_load_balancer_attributes()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .map_err(|e| from_sdk("reading load balancer attributes", e))?;
        let current: HashMap<&str, &str> = out
            .attributes()
            .iter()
            .filter_map(|a| Some((a.key()?, a.value()?)))
            .collect();
        let changed: Vec<LoadBalancerAttribute> = wanted
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(&v.as_str()))
            .map(|(k, v)| LoadBalancerAttribute::builder().key(*k).value(v).build())
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        self.elb()
            .await
            .modify_load_balancer_attributes()
            .load_balancer_arn(lb_arn)
            .set_attributes(Some(changed))
            .send()
            .await
            .map_err(|e| from_sdk("setting load balancer attributes", e))?;
        Ok(())
    }
}
