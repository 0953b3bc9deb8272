//! Automations and blocks on the control node: a file of automations put whole, each paused,
//! resumed or deleted; blocks sealed before they are stored, shown masked, and unsealed only for
//! the node that runs a flow run needing them, under that run's epoch.

use super::*;
use flotilla_cluster::secrets::SecretsKey;
use flotilla_cluster::wire::{AutomationChange, BlockView};
use flotilla_runtime::Setting;
use flotilla_runtime::automation::{AutomationEdit, AutomationRecord, AutomationSpec};
use flotilla_runtime::block::{BlockRecord, BlockType, block_key};
use flotilla_runtime::work_queue::automation_key;

impl ControlState {
    /// Answers a request about automations or blocks, on a task of its own.
    pub(super) fn settings_request(&mut self, request: Request, reply: RpcReplyPort<Wire<Response>>) {
        let p = self.persistence.clone();
        let secrets = self.secrets.clone();
        tokio::spawn(async move {
            let r = answer(&p, secrets.as_deref(), request).await;
            let _ = reply.send(Wire::new(r));
        });
    }
}

fn submitted(r: SubmitResult) -> Response {
    match r {
        Ok(Ok(Reply::SettingsPut { created, updated })) => Response::SettingsPut { created, updated },
        Ok(Ok(Reply::SettingPut { created })) => Response::SettingsPut {
            created: u32::from(created),
            updated: u32::from(!created),
        },
        Ok(Ok(_)) => Response::Done,
        Ok(Err(refusal)) => refused(ErrorKind::of_refusal(&refusal), refusal.to_string()),
        Err(e) => persist_err(e),
    }
}

async fn all_settings(p: &PersistenceHandle) -> Result<Vec<Setting>, Response> {
    p.settings().await.map_err(persist_err)
}

async fn automation(p: &PersistenceHandle, name: &str) -> Result<AutomationRecord, Response> {
    all_settings(p)
        .await?
        .into_iter()
        .find_map(|s| match s {
            Setting::Automation(a) if a.spec.name == name => Some(*a),
            _ => None,
        })
        .ok_or_else(|| refused(ErrorKind::NotFound, format!("no automation named {name:?}")))
}

async fn block(p: &PersistenceHandle, kind: BlockType, name: &str) -> Result<BlockRecord, Response> {
    let key = block_key(kind, name);
    all_settings(p)
        .await?
        .into_iter()
        .find_map(|s| match s {
            Setting::Block(b) if block_key(b.kind, &b.name) == key => Some(*b),
            _ => None,
        })
        .ok_or_else(|| refused(ErrorKind::NotFound, format!("no block {kind}/{name}")))
}

/// Checks a file's automations again (a client is never trusted) and puts them whole.
async fn put_automations(p: &PersistenceHandle, specs: Vec<AutomationSpec>) -> Response {
    if specs.len() > flotilla_runtime::automation::AUTOMATIONS_PER_FILE_MAX {
        return refused(
            ErrorKind::Invalid,
            format!(
                "at most {} automations at once",
                flotilla_runtime::automation::AUTOMATIONS_PER_FILE_MAX
            ),
        );
    }
    if let Some((name, e)) = specs.iter().find_map(|s| s.check().err().map(|e| (&s.name, e))) {
        return refused(ErrorKind::Invalid, format!("automation {name:?}: {e}"));
    }
    let at = now();
    let settings = specs
        .into_iter()
        .map(|s| Setting::Automation(Box::new(AutomationRecord::new(s, at))))
        .collect();
    submitted(p.submit(Command::PutSettings { settings, at }).await)
}

/// Seals a block's secret fields and stores it.
async fn put_block(
    p: &PersistenceHandle,
    secrets: Option<&SecretsKey>,
    kind: BlockType,
    name: String,
    fields: serde_json::Value,
) -> Response {
    let Some(key) = secrets else {
        return refused(
            ErrorKind::Unavailable,
            "this node has no secrets key to seal a block with",
        );
    };
    let doc = match kind.check(&fields) {
        Ok(d) => d,
        // serde's message names the field, never its value.
        Err(e) => return refused(ErrorKind::Invalid, format!("block {kind}/{name}: {e}")),
    };
    let at = now();
    let created = match block(p, kind, &name).await {
        Ok(old) => old.created,
        Err(_) => at,
    };
    let mut record = BlockRecord {
        kind,
        name,
        plain: serde_json::Map::new(),
        sealed: std::collections::BTreeMap::new(),
        created,
        updated: at,
    };
    for (field, value) in doc {
        if kind.is_secret(&field) {
            let plaintext = serde_json::to_vec(&value).unwrap_or_default();
            let aad = BlockRecord::associated_data(kind, &record.name, &field);
            record.sealed.insert(field, key.seal(&plaintext, &aad));
        } else {
            record.plain.insert(field, value);
        }
    }
    let setting = Setting::Block(Box::new(record));
    submitted(p.submit(Command::PutSetting { setting, at }).await)
}

/// A block's fields, unsealed.
pub(crate) fn unseal(key: &SecretsKey, b: &BlockRecord) -> Result<serde_json::Value, String> {
    let mut out = b.plain.clone();
    for (field, sealed) in &b.sealed {
        let aad = BlockRecord::associated_data(b.kind, &b.name, field);
        let bytes = key
            .open(sealed, &aad)
            .map_err(|e| format!("block {}: field {field}: {e}", b.reference()))?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("block {}: field {field}: {e}", b.reference()))?;
        out.insert(field.clone(), v);
    }
    Ok(serde_json::Value::Object(out))
}

/// The blocks named, unsealed, for the node running `flow_run` under `epoch`.
async fn resolve(
    p: &PersistenceHandle,
    secrets: Option<&SecretsKey>,
    flow_run: FlowRunId,
    epoch: flotilla_runtime::Epoch,
    refs: Vec<String>,
) -> Response {
    let Some(key) = secrets else {
        return refused(ErrorKind::Unavailable, "this node has no secrets key");
    };
    if refs.len() > 64 {
        return refused(ErrorKind::Invalid, "at most 64 blocks for one run");
    }
    match p.flow_run(flow_run).await {
        Ok(Some(r))
            if r.epoch == epoch
                && matches!(r.lifecycle.state.kind, StateType::Pending | StateType::Running) => {}
        Ok(Some(_)) => {
            return refused(
                ErrorKind::Forbidden,
                format!("flow run {flow_run} does not run under that epoch: its blocks are not given"),
            );
        }
        Ok(None) => return refused(ErrorKind::NotFound, format!("no flow run {flow_run}")),
        Err(e) => return persist_err(e),
    }
    let mut out = Vec::with_capacity(refs.len());
    for r in refs {
        let (kind, name) = match flotilla_runtime::block::parse_reference(&r) {
            Ok(x) => x,
            Err(e) => return refused(ErrorKind::Invalid, e),
        };
        let b = match block(p, kind, &name).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        match unseal(key, &b) {
            Ok(v) => out.push((r, v)),
            Err(e) => return refused(ErrorKind::Unavailable, e),
        }
    }
    Response::Resolved(out)
}

async fn answer(p: &PersistenceHandle, secrets: Option<&SecretsKey>, request: Request) -> Response {
    match request {
        Request::PutAutomations(specs) => put_automations(p, specs).await,
        Request::Automations => match all_settings(p).await {
            Ok(all) => Response::Automations(
                all.into_iter()
                    .filter_map(|s| match s {
                        Setting::Automation(a) => Some(*a),
                        _ => None,
                    })
                    .collect(),
            ),
            Err(r) => r,
        },
        Request::Automation { name, change } => {
            let edit = match change {
                AutomationChange::Inspect => {
                    return automation(p, &name)
                        .await
                        .map_or_else(|r| r, |a| Response::Automations(vec![a]));
                }
                AutomationChange::Delete => {
                    if let Err(r) = automation(p, &name).await {
                        return r;
                    }
                    return submitted(
                        p.submit(Command::DeleteSetting {
                            key: automation_key(&name),
                            at: now(),
                        })
                        .await,
                    );
                }
                AutomationChange::Pause => AutomationEdit::Pause,
                AutomationChange::Resume => AutomationEdit::Resume,
            };
            match submitted(
                p.submit(Command::EditAutomation {
                    name: name.clone(),
                    edit,
                    at: now(),
                })
                .await,
            ) {
                Response::Done => automation(p, &name)
                    .await
                    .map_or_else(|r| r, |a| Response::Automations(vec![a])),
                other => other,
            }
        }
        Request::PutBlock { kind, name, fields } => put_block(p, secrets, kind, name, fields).await,
        Request::Blocks => match all_settings(p).await {
            Ok(all) => Response::Blocks(
                all.iter()
                    .filter_map(|s| match s {
                        Setting::Block(b) => Some(BlockView::from(b.as_ref())),
                        _ => None,
                    })
                    .collect(),
            ),
            Err(r) => r,
        },
        Request::Block { kind, name, delete } => match block(p, kind, &name).await {
            Err(r) => r,
            Ok(b) if !delete => Response::Blocks(vec![BlockView::from(&b)]),
            Ok(_) => submitted(
                p.submit(Command::DeleteSetting {
                    key: block_key(kind, &name),
                    at: now(),
                })
                .await,
            ),
        },
        Request::ResolveBlocks {
            flow_run,
            epoch,
            refs,
        } => resolve(p, secrets, flow_run, epoch, refs).await,
        Request::StoreBlock(name) => {
            let Some(key) = secrets else {
                return refused(ErrorKind::Unavailable, "this node has no secrets key");
            };
            match block(p, BlockType::S3, &name).await {
                Ok(b) => match unseal(key, &b) {
                    Ok(v) => Response::Resolved(vec![(b.reference(), v)]),
                    Err(e) => refused(ErrorKind::Unavailable, e),
                },
                Err(r) => r,
            }
        }
        _ => refused(ErrorKind::Protocol, "not a request about automations or blocks"),
    }
}
