//! Routing: which destinations a message goes to, decided from its header before it is stored,
//! so its queue entries are logged with it (promise 2).
//!
//! A route matches when every condition it names matches: the listener the message came in on,
//! an MSH-9 pattern (`ADT^*`, `ORU^R01`, `*`; components compared pairwise, `*` matches any
//! value, a pattern with fewer components ignores the rest), the MSH-3 and MSH-4 namespace ids
//! (exact or `*`, or a `prefix*`). A message fans out to the union of the destinations of every
//! matching route, in configuration order, each once.

use crate::config::{DestinationSettings, RouteSettings};

/// Compiled routes.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<RouteSettings>,
    /// Destination names, by index.
    names: Vec<String>,
}

/// The header fields routing looks at.
pub struct RouteInput<'a> {
    pub listener: &'a str,
    /// MSH-9 as `code^trigger^structure`.
    pub message_type: &'a str,
    /// MSH-3 / MSH-4 namespace ids (first component).
    pub sending_application: &'a str,
    pub sending_facility: &'a str,
}

impl Router {
    pub fn new(routes: &[RouteSettings], destinations: &[DestinationSettings]) -> Router {
        Router {
            routes: routes.to_vec(),
            names: destinations.iter().map(|d| d.name.clone()).collect(),
        }
    }

    /// Whether any route is configured.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Destination names for a message; empty when no route matches.
    pub fn destinations(&self, m: &RouteInput<'_>) -> Vec<String> {
        let mut picked: Vec<usize> = Vec::new();
        for r in &self.routes {
            if route_matches(r, m) {
                for d in &r.destinations {
                    if !picked.contains(d) {
                        picked.push(*d);
                    }
                }
            }
        }
        picked.sort_unstable();
        picked
            .into_iter()
            .filter_map(|i| self.names.get(i).cloned())
            .collect()
    }
}

fn route_matches(r: &RouteSettings, m: &RouteInput<'_>) -> bool {
    (r.sources.is_empty() || r.sources.iter().any(|s| s == m.listener))
        && (r.message_types.is_empty()
            || r.message_types
                .iter()
                .any(|p| type_matches(p, m.message_type)))
        && (r.sending_applications.is_empty()
            || r.sending_applications
                .iter()
                .any(|p| glob(p, m.sending_application)))
        && (r.sending_facilities.is_empty()
            || r.sending_facilities
                .iter()
                .any(|p| glob(p, m.sending_facility)))
}

/// `ADT^*` against `ADT^A01^ADT_A01`.
fn type_matches(pattern: &str, message_type: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let mut actual = message_type.split('^');
    pattern
        .split('^')
        .all(|p| glob(p, actual.next().unwrap_or("")))
}

/// Exact, `*`, or `prefix*` (case-sensitive, as HL7 codes are).
fn glob(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(types: &[&str], apps: &[&str], sources: &[&str], dests: &[usize]) -> RouteSettings {
        RouteSettings {
            name: "r".into(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            message_types: types.iter().map(|s| s.to_string()).collect(),
            sending_applications: apps.iter().map(|s| s.to_string()).collect(),
            sending_facilities: vec![],
            destinations: dests.to_vec(),
        }
    }

    fn router(routes: Vec<RouteSettings>) -> Router {
        Router {
            routes,
            names: vec!["a".into(), "b".into(), "c".into()],
        }
    }

    fn input<'a>(listener: &'a str, ty: &'a str, app: &'a str) -> RouteInput<'a> {
        RouteInput {
            listener,
            message_type: ty,
            sending_application: app,
            sending_facility: "CLINIC",
        }
    }

    #[test]
    fn patterns_fan_out_once_in_config_order() {
        let r = router(vec![
            route(&["ADT^*"], &[], &[], &[1, 0]),
            route(&["ADT^A01", "ORU^R01"], &[], &[], &[0, 2]),
        ]);
        assert_eq!(
            r.destinations(&input("x", "ADT^A01^ADT_A01", "LAB")),
            ["a", "b", "c"]
        );
        assert_eq!(r.destinations(&input("x", "ADT^A08", "LAB")), ["a", "b"]);
        assert_eq!(
            r.destinations(&input("x", "ORU^R01^ORU_R01", "LAB")),
            ["a", "c"]
        );
        assert!(r.destinations(&input("x", "ORM^O01", "LAB")).is_empty());
        assert!(r.destinations(&input("x", "ADTX^A01", "LAB")).is_empty());
    }

    #[test]
    fn sources_and_sending_application_narrow_a_route() {
        let r = router(vec![route(&["*"], &["LAB*"], &["integration"], &[2])]);
        assert_eq!(
            r.destinations(&input("integration", "ADT^A01", "LABSYS")),
            ["c"]
        );
        assert!(r
            .destinations(&input("legacy", "ADT^A01", "LABSYS"))
            .is_empty());
        assert!(r
            .destinations(&input("integration", "ADT^A01", "RIS"))
            .is_empty());
    }
}
