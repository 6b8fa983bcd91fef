//! Status conditions in the shape of `metav1.Condition`, with a schema the 1.20 API server
//! accepts (k8s-openapi's own type carries no schema without an extra feature).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The condition every Portico resource carries: is this object in effect?
pub const ACCEPTED: &str = "Accepted";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Accepted`.
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    /// CamelCase reason, e.g. `TargetNotFound`.
    pub reason: String,
    pub message: String,
    /// The `.metadata.generation` this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339; changes only when `status` does.
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl Condition {
    /// `conditions` with `next` put in place of the condition of its type. The transition time
    /// is kept when the status did not change, so rewriting the same verdict is a no-op.
    pub fn merge(conditions: &[Condition], mut next: Condition) -> Vec<Condition> {
        let mut out: Vec<Condition> = Vec::with_capacity(conditions.len() + 1);
        for c in conditions {
            if c.type_ == next.type_ {
                if c.status == next.status {
                    next.last_transition_time = c.last_transition_time.clone();
                }
            } else {
                out.push(c.clone());
            }
        }
        out.push(next);
        out.sort_by(|a, b| a.type_.cmp(&b.type_));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(status: ConditionStatus, reason: &str, at: &str) -> Condition {
        Condition {
            type_: ACCEPTED.into(),
            status,
            reason: reason.into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: at.into(),
        }
    }

    #[test]
    fn the_transition_time_moves_only_when_the_status_changes() {
        let old = vec![accepted(ConditionStatus::True, "Accepted", "t1")];
        let same = Condition::merge(&old, accepted(ConditionStatus::True, "Accepted", "t2"));
        assert_eq!(same[0].last_transition_time, "t1");
        let flipped = Condition::merge(
            &old,
            accepted(ConditionStatus::False, "TargetNotFound", "t3"),
        );
        assert_eq!(flipped.len(), 1);
        assert_eq!(flipped[0].last_transition_time, "t3");
        assert_eq!(flipped[0].reason, "TargetNotFound");
    }
}
