//! Events: `{id, occurred, event, resource, related, payload}`, appended on every state change
//! and by users.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, EventId};
use crate::state::{State, StateName, StateType};
use crate::time::Timestamp;

/// The label that names a resource.
pub const RESOURCE_ID: &str = "flotilla.resource.id";
/// The label that gives a resource's human name.
pub const RESOURCE_NAME: &str = "flotilla.resource.name";
/// The label that gives a related resource's role.
pub const RESOURCE_ROLE: &str = "flotilla.resource.role";

/// The most labels a resource may carry.
pub const RESOURCE_LABELS_MAX: usize = 64;
/// The most related resources an event may carry.
pub const RELATED_MAX: usize = 64;
/// The longest event name.
pub const EVENT_NAME_LEN_MAX: usize = 1024;
/// The largest payload, encoded.
pub const EVENT_PAYLOAD_BYTES_MAX: usize = 256 * 1024;

/// A resource: labels, one of which ([`RESOURCE_ID`]) names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Resource(pub BTreeMap<String, String>);

impl Resource {
    /// A resource with an id and optionally a name.
    pub fn new(id: impl Into<String>, name: Option<&str>) -> Self {
        let mut labels = BTreeMap::new();
        labels.insert(RESOURCE_ID.to_owned(), id.into());
        if let Some(name) = name {
            labels.insert(RESOURCE_NAME.to_owned(), name.to_owned());
        }
        Resource(labels)
    }

    /// With one more label.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.0.insert(key.to_owned(), value.into());
        self
    }

    /// The resource id label.
    pub fn id(&self) -> Option<&str> {
        self.0.get(RESOURCE_ID).map(String::as_str)
    }

    /// The resource name label.
    pub fn name(&self) -> Option<&str> {
        self.0.get(RESOURCE_NAME).map(String::as_str)
    }
}

/// What an event carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EventPayload {
    /// A run changed state; this is also the run's state history entry.
    StateChange {
        /// The state type before.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_type: Option<StateType>,
        /// The state name before.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_name: Option<StateName>,
        /// The state written.
        state: State,
        /// The run's ownership epoch after the change.
        epoch: Epoch,
    },
    /// Anything else, as JSON.
    Data(serde_json::Value),
}

/// An event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The event's id (sorts in append order).
    pub id: EventId,
    /// When it happened.
    pub occurred: Timestamp,
    /// Its name, dotted (`flotilla.flow-run.Completed`).
    pub event: String,
    /// What it is about.
    pub resource: Resource,
    /// Other resources involved.
    #[serde(default)]
    pub related: Vec<Resource>,
    /// The payload.
    pub payload: EventPayload,
}

impl Event {
    /// A user's event named `name` about `resource`, with related resources and a JSON
    /// payload; its id is nil, for the log to give it the next one in order.
    pub fn user(
        name: &str,
        occurred: Timestamp,
        resource: Resource,
        related: Vec<Resource>,
        payload: serde_json::Value,
    ) -> Event {
        Event {
            id: EventId::from_bytes([0; 16]),
            occurred,
            event: name.to_owned(),
            resource,
            related,
            payload: EventPayload::Data(payload),
        }
    }

    /// The state recorded by a state-change event.
    pub fn state(&self) -> Option<&State> {
        match &self.payload {
            EventPayload::StateChange { state, .. } => Some(state),
            EventPayload::Data(_) => None,
        }
    }
}
