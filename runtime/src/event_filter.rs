//! The one event filter, used by the CLI, the SDK and automations: by event name (exact, a
//! prefix written `flotilla.flow-run.*`, exclusions), by the resource's labels, by related
//! resources (by role and labels) and by time. Label values may hold `*` wildcards.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{Event, RESOURCE_ROLE, Resource};
use crate::time::Timestamp;

/// The most patterns in one list of a filter.
pub const PATTERNS_MAX: usize = 64;
/// The longest pattern.
pub const PATTERN_LEN_MAX: usize = 1024;

/// Label patterns a resource must match: for each label, one of its patterns (`*` matches any
/// run of characters). In TOML or JSON a value is a pattern or a list of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LabelSpec(pub BTreeMap<String, OneOrMany>);

/// One pattern, or several (any of them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One pattern.
    One(String),
    /// Any of these.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The patterns.
    pub fn patterns(&self) -> &[String] {
        match self {
            OneOrMany::One(p) => std::slice::from_ref(p),
            OneOrMany::Many(ps) => ps,
        }
    }
}

impl LabelSpec {
    /// Adds a pattern for a label (a label given twice matches either).
    pub fn add(&mut self, label: &str, pattern: &str) {
        match self.0.remove(label) {
            None => {
                self.0
                    .insert(label.to_owned(), OneOrMany::One(pattern.to_owned()));
            }
            Some(OneOrMany::One(p)) => {
                self.0
                    .insert(label.to_owned(), OneOrMany::Many(vec![p, pattern.to_owned()]));
            }
            Some(OneOrMany::Many(mut ps)) => {
                ps.push(pattern.to_owned());
                self.0.insert(label.to_owned(), OneOrMany::Many(ps));
            }
        }
    }

    /// Whether it names no label (matches every resource).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `resource` matches every label's patterns.
    pub fn matches(&self, resource: &Resource) -> bool {
        self.0.iter().all(|(label, patterns)| {
            resource
                .0
                .get(label)
                .is_some_and(|v| patterns.patterns().iter().any(|p| glob(p, v)))
        })
    }

    fn check(&self, what: &str) -> Result<(), FilterError> {
        if self.0.len() > PATTERNS_MAX {
            return Err(FilterError(format!("{what}: at most {PATTERNS_MAX} labels")));
        }
        for (label, patterns) in &self.0 {
            check_pattern(what, label)?;
            if patterns.patterns().is_empty() || patterns.patterns().len() > PATTERNS_MAX {
                return Err(FilterError(format!(
                    "{what} {label:?}: 1 to {PATTERNS_MAX} patterns"
                )));
            }
            for p in patterns.patterns() {
                check_pattern(what, p)?;
            }
        }
        Ok(())
    }
}

/// Which events: all of its parts must match (an empty part matches every event).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    /// Event names, any of them: exact, or a prefix written with a trailing `*`
    /// (`flotilla.flow-run.*`), or any pattern with `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event: Vec<String>,
    /// Event names excluded (the same forms).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// The resource's labels.
    #[serde(default, skip_serializing_if = "LabelSpec::is_empty")]
    pub resource: LabelSpec,
    /// Related resources: each spec is matched by one of the event's related resources (a
    /// spec may name its role with `flotilla.resource.role`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub related: Vec<LabelSpec>,
    /// Events that occurred at or after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// Events that occurred before this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
}

/// Why a filter is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(pub String);

fn check_pattern(what: &str, p: &str) -> Result<(), FilterError> {
    if p.is_empty() || p.len() > PATTERN_LEN_MAX {
        return Err(FilterError(format!(
            "{what}: a pattern is 1 to {PATTERN_LEN_MAX} bytes long"
        )));
    }
    Ok(())
}

impl EventFilter {
    /// Checks the filter's sizes: bounded, so that matching is too.
    pub fn check(&self) -> Result<(), FilterError> {
        for (what, names) in [("event", &self.event), ("exclude", &self.exclude)] {
            if names.len() > PATTERNS_MAX {
                return Err(FilterError(format!("{what}: at most {PATTERNS_MAX} names")));
            }
            for n in names {
                check_pattern(what, n)?;
            }
        }
        self.resource.check("resource")?;
        if self.related.len() > PATTERNS_MAX {
            return Err(FilterError(format!("related: at most {PATTERNS_MAX} resources")));
        }
        for r in &self.related {
            r.check("related")?;
        }
        if let (Some(s), Some(u)) = (self.since, self.until)
            && u < s
        {
            return Err(FilterError("until is before since".into()));
        }
        Ok(())
    }

    /// Whether the event's name matches (named, and not excluded).
    pub fn name_matches(&self, name: &str) -> bool {
        (self.event.is_empty() || self.event.iter().any(|p| glob(p, name)))
            && !self.exclude.iter().any(|p| glob(p, name))
    }

    /// Whether `e` matches every part.
    pub fn matches(&self, e: &Event) -> bool {
        self.since.is_none_or(|s| e.occurred >= s)
            && self.until.is_none_or(|u| e.occurred < u)
            && self.name_matches(&e.event)
            && self.resource.matches(&e.resource)
            && self
                .related
                .iter()
                .all(|spec| e.related.iter().any(|r| spec.matches(r)))
    }

    /// A related-resource spec for `role` with one label's pattern (`ROLE:KEY=VALUE` on the
    /// command line).
    pub fn related_spec(role: &str, label: &str, pattern: &str) -> LabelSpec {
        let mut spec = LabelSpec::default();
        spec.add(RESOURCE_ROLE, role);
        spec.add(label, pattern);
        spec
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (none included)
/// and every other character itself. Linear in their lengths times the number of stars.
pub fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No star: the whole text.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventPayload, RESOURCE_ID, RESOURCE_NAME};
    use crate::ids::EventId;

    fn event(name: &str, resource: Resource, related: Vec<Resource>, at: u64) -> Event {
        Event {
            id: EventId::from_uuid(uuid::Uuid::from_u128(u128::from(at))),
            occurred: Timestamp::from_micros(i64::try_from(at).unwrap_or(0)),
            event: name.to_owned(),
            resource,
            related,
            payload: EventPayload::Data(serde_json::Value::Null),
        }
    }

    #[test]
    fn globs_match_as_written() {
        assert!(glob("flotilla.flow-run.*", "flotilla.flow-run.Failed"));
        assert!(glob("flotilla.flow-run.*", "flotilla.flow-run."));
        assert!(!glob("flotilla.flow-run.*", "flotilla.task-run.Failed"));
        assert!(glob("a*c*e", "abcde"));
        assert!(!glob("a*c*e", "abcd"));
        assert!(glob("*", ""));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(glob("*.Failed", "flotilla.flow-run.Failed"));
        assert!(!glob("ab*ba", "aba"), "the ends may not overlap");
    }

    #[test]
    fn every_part_of_a_filter_must_match() {
        let run = Resource::new("flotilla.flow-run.1", Some("etl"));
        let deployment =
            Resource::new("flotilla.deployment.9", Some("nightly")).with(RESOURCE_ROLE, "deployment");
        let tag = Resource::new("flotilla.tag.db", None).with(RESOURCE_ROLE, "tag");
        let failed = event("flotilla.flow-run.Failed", run.clone(), vec![deployment, tag], 10);

        let mut f = EventFilter {
            event: vec!["flotilla.flow-run.*".into()],
            ..EventFilter::default()
        };
        assert!(f.matches(&failed));
        f.exclude = vec!["*.Failed".into()];
        assert!(!f.matches(&failed), "excluded by name");
        f.exclude.clear();

        f.resource.add(RESOURCE_NAME, "et*");
        assert!(f.matches(&failed));
        f.resource.add(RESOURCE_ID, "flotilla.flow-run.2");
        assert!(!f.matches(&failed), "its id is not that one");
        f.resource.add(RESOURCE_ID, "flotilla.flow-run.1");
        assert!(f.matches(&failed), "a label given twice matches either");

        f.related = vec![EventFilter::related_spec("deployment", RESOURCE_NAME, "nightly")];
        assert!(f.matches(&failed));
        f.related
            .push(EventFilter::related_spec("deployment", RESOURCE_NAME, "hourly"));
        assert!(!f.matches(&failed), "every related spec must be matched");
        f.related = vec![EventFilter::related_spec("tag", RESOURCE_NAME, "db")];
        assert!(!f.matches(&failed), "the tag resource has no name label");
        f.related = vec![EventFilter::related_spec("tag", RESOURCE_ID, "flotilla.tag.db")];
        assert!(f.matches(&failed));

        f.since = Some(Timestamp::from_micros(10));
        f.until = Some(Timestamp::from_micros(11));
        assert!(f.matches(&failed));
        f.since = Some(Timestamp::from_micros(11));
        f.until = None;
        assert!(!f.matches(&failed), "before the window");
    }

    #[test]
    fn filters_read_from_toml_take_one_pattern_or_a_list_and_refuse_unknown_keys() {
        let f: EventFilter = toml::from_str(
            r#"
            event = ["flotilla.flow-run.Failed"]
            resource = { "flotilla.resource.id" = ["app.a", "app.b"], "flotilla.resource.name" = "pump" }
            related = [{ "flotilla.resource.role" = "deployment", "flotilla.resource.name" = "nightly" }]
            "#,
        )
        .expect("a filter");
        assert_eq!(f.resource.0["flotilla.resource.id"].patterns().len(), 2);
        assert_eq!(f.related.len(), 1);
        assert!(toml::from_str::<EventFilter>("events = []").is_err());
    }

    #[test]
    fn oversized_filters_are_refused() {
        let f = EventFilter {
            event: vec!["x".repeat(PATTERN_LEN_MAX + 1)],
            ..EventFilter::default()
        };
        assert!(f.check().is_err());
        let f = EventFilter {
            exclude: vec!["x".into(); PATTERNS_MAX + 1],
            ..EventFilter::default()
        };
        assert!(f.check().is_err());
        let f = EventFilter {
            since: Some(Timestamp::from_micros(2)),
            until: Some(Timestamp::from_micros(1)),
            ..EventFilter::default()
        };
        assert!(f.check().is_err());
        assert!(EventFilter::default().check().is_ok());
    }

    proptest::proptest! {
        /// A star-free pattern matches only itself; `*` + it matches any text ending with it.
        #[test]
        fn glob_agrees_with_plain_comparisons(p in "[a-c.]{0,6}", t in "[a-c.]{0,8}") {
            proptest::prop_assert_eq!(glob(&p, &t), p == t);
            let star = format!("*{p}");
            proptest::prop_assert_eq!(glob(&star, &t), t.ends_with(&p));
            let prefix = format!("{p}*");
            proptest::prop_assert_eq!(glob(&prefix, &t), t.starts_with(&p));
        }

        #[test]
        fn any_pattern_matches_without_panicking(p in ".{0,12}", t in ".{0,12}") {
            let _ = glob(&p, &t);
        }
    }
}
