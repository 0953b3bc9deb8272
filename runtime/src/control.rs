//! The control plane's decisions, as one pure, deterministic machine in the style of
//! quinn-proto and openraft's engine: [`ControlMachine`] (see [`machine`]) is given the time and
//! an input and says what to do. The control actor feeds it and carries out its effects; a
//! seeded simulation drives it the same way (`runtime/tests/simulation.rs`).
//!
//! Its parts, each a pure structure of its own: the [`roster`](MemberStatus) of members from
//! their heartbeats, [`dispatch`] (which run goes where, under which limits), [`slots`]
//! (tag-limit leases), [`handouts`] (runs handed to a node, watched until they end). The
//! [`scheduler`] is a machine of its own: which runs deployments' schedules make, and when each
//! is handed to placement.
//!
//! The durable control state is not here: it is the store's, changed only by
//! [`crate::apply::apply`] of a [`crate::Command`] in log order, so replaying the log rebuilds
//! it exactly. Everything the machine wants changed durably is an `Append` of a command whose
//! key is derived from what it is about (`crash/{node}/{incarnation}`, run + epoch, the
//! client's request id or run id); nothing here reads a clock or OS randomness.

pub mod dispatch;
pub mod handouts;
mod ids;
pub mod machine;
mod roster;
pub mod scheduler;
pub mod slots;

pub use dispatch::{Placement, QueueLoad, Whereabouts};
pub use handouts::Handouts;
pub use ids::{Incarnation, RequestId, derived_id};
pub use machine::{ControlConfig, ControlMachine};
pub use roster::{FlowDefaults, MemberStatus};
pub use slots::{SlotGrant, SlotRequest};
