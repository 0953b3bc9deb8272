//! `flotilla automation …` and `flotilla block …`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use flotilla_cluster::wire::{AutomationChange, BlockView};
use flotilla_runtime::automation::{AutomationRecord, AutomationSpec};
use flotilla_runtime::block::BlockType;

use crate::config::Conn;

/// The largest file read.
const FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Automation commands.
#[derive(Debug, Subcommand)]
pub enum AutomationCmd {
    /// Create or replace the automations of a TOML file (`[[automation]]`), all or none.
    Create {
        /// The file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the automations.
    Ls {
        /// One JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one automation with its last firings and their actions' outcomes.
    Inspect {
        /// Its name.
        name: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop evaluating an automation.
    Pause {
        /// Its name.
        name: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Evaluate an automation again (its counting starts afresh).
    Resume {
        /// Its name.
        name: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete an automation.
    Delete {
        /// Its name.
        name: String,
        /// Print `{"deleted": NAME}`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Block commands.
#[derive(Debug, Subcommand)]
pub enum BlockCmd {
    /// The types of block and their fields.
    Types {
        /// One JSON array.
        #[arg(long)]
        json: bool,
        /// (Accepted like every command's; no node is asked.)
        #[command(flatten)]
        conn: Conn,
    },
    /// Create or replace a block: `--field KEY=VALUE` each (`headers.NAME=VALUE` for a map),
    /// or the whole document with `--json JSON|@FILE`.
    Create {
        /// Its type: secret, webhook, s3, env, json.
        kind: String,
        /// Its name.
        name: String,
        /// A field.
        #[arg(long = "field", value_name = "KEY=VALUE")]
        fields: Vec<String>,
        /// The document (JSON, or @FILE); given or not, the block is printed as JSON.
        #[arg(long, num_args = 0..=1, value_name = "JSON|@FILE")]
        json: Option<Option<String>>,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the blocks (secret fields masked).
    Ls {
        /// One JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one block, `TYPE/NAME` (secret fields masked).
    Inspect {
        /// `TYPE/NAME`.
        reference: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a block, `TYPE/NAME`.
    Delete {
        /// `TYPE/NAME`.
        reference: String,
        /// Print `{"deleted": "TYPE/NAME"}`.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Reads a TOML file of automations, checked whole.
pub fn read_automations(path: &Path) -> anyhow::Result<(String, Vec<AutomationSpec>)> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(meta.len() <= FILE_BYTES_MAX, "{} is over 4 MiB", path.display());
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let specs = flotilla_runtime::automation::parse_file(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}; nothing was created", path.display()))?;
    Ok((text, specs))
}

/// Puts automations, all or none; prints what was done.
pub async fn put(conn: &Conn, specs: Vec<AutomationSpec>, json: bool) -> anyhow::Result<()> {
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let s = conn.connect().await?;
    let (created, updated) = s.client.put_automations(specs).await.map_err(|e| s.fail(e))?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "created": created, "updated": updated, "automations": names })
        );
    } else {
        let unchanged = (names.len() as u32).saturating_sub(created + updated);
        println!(
            "{} automation(s): {created} created, {updated} changed, {unchanged} unchanged",
            names.len()
        );
    }
    Ok(())
}

fn automation_json(a: &AutomationRecord, full: bool) -> serde_json::Value {
    let last = a.recent.back();
    let mut v = serde_json::json!({
        "name": a.spec.name,
        "description": a.spec.description,
        "paused": a.spec.paused,
        "trigger": a.spec.trigger,
        "actions": a.spec.actions,
        "created": a.created,
        "armed": a.armed,
        "firings": a.firings,
        "last_fired": last.map(|r| r.firing.at),
    });
    if full {
        v["recent"] = serde_json::Value::Array(
            a.recent
                .iter()
                .rev()
                .map(|r| {
                    serde_json::json!({
                        "key": r.firing.key,
                        "bucket": r.firing.bucket,
                        "window_start": r.firing.window_start,
                        "at": r.firing.at,
                        "events": r.firing.events.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "done": r.done,
                        "outcomes": r.outcomes,
                    })
                })
                .collect(),
        );
    }
    v
}

fn print_automations(all: &[AutomationRecord], json: bool, full: bool) -> anyhow::Result<()> {
    if json {
        let out: Vec<_> = all.iter().map(|a| automation_json(a, full)).collect();
        if full && out.len() == 1 {
            println!("{}", out[0]);
        } else {
            println!("{}", serde_json::Value::Array(out));
        }
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<28} {:>7} {:>8} {:<28}",
        "NAME", "PAUSED", "FIRINGS", "LAST FIRED"
    )?;
    for a in all {
        writeln!(
            out,
            "{:<28} {:>7} {:>8} {:<28}",
            a.spec.name,
            if a.spec.paused { "yes" } else { "no" },
            a.firings,
            a.recent
                .back()
                .map_or("-".to_owned(), |r| r.firing.at.to_string())
        )?;
        if full {
            for r in a.recent.iter().rev() {
                writeln!(out, "  fired {} ({})", r.firing.at, r.firing.key)?;
                for o in &r.outcomes {
                    writeln!(
                        out,
                        "    {} {}: {}",
                        if o.ok { "ok    " } else { "FAILED" },
                        o.action,
                        o.detail
                    )?;
                }
                if !r.done {
                    writeln!(out, "    (actions running)")?;
                }
            }
        }
    }
    Ok(())
}

pub async fn automation(cmd: AutomationCmd) -> anyhow::Result<bool> {
    let (conn, name, change, json) = match cmd {
        AutomationCmd::Create { file, json, conn } => {
            let (_, specs) = read_automations(&file)?;
            anyhow::ensure!(
                !specs.is_empty(),
                "{} has no [[automation]] table",
                file.display()
            );
            put(&conn, specs, json).await?;
            return Ok(true);
        }
        AutomationCmd::Ls { json, conn } => {
            let s = conn.connect().await?;
            let all = s.client.automations(None).await.map_err(|e| s.fail(e))?;
            print_automations(&all, json, false)?;
            return Ok(true);
        }
        AutomationCmd::Inspect { name, json, conn } => (conn, name, AutomationChange::Inspect, json),
        AutomationCmd::Pause { name, json, conn } => (conn, name, AutomationChange::Pause, json),
        AutomationCmd::Resume { name, json, conn } => (conn, name, AutomationChange::Resume, json),
        AutomationCmd::Delete { name, json, conn } => (conn, name, AutomationChange::Delete, json),
    };
    let s = conn.connect().await?;
    let out = s
        .client
        .automations(Some((&name, change)))
        .await
        .map_err(|e| s.fail(e))?;
    match change {
        AutomationChange::Delete if json => println!("{}", serde_json::json!({ "deleted": name })),
        AutomationChange::Delete => println!("{name}: deleted"),
        _ => print_automations(&out, json, true)?,
    }
    Ok(true)
}

/// `KEY=VALUE` pairs as a block document of `kind`: `true`/`false` for boolean fields,
/// `headers.NAME=VALUE` into a map field, JSON (or else a string) for a `json` block.
fn document(kind: BlockType, fields: &[String]) -> anyhow::Result<serde_json::Value> {
    let schema = kind.schema();
    let mut doc = serde_json::Map::new();
    for f in fields {
        let (k, v) = f.split_once('=').ok_or_else(|| {
            anyhow::anyhow!(
                "--field {:?}: expected KEY=VALUE",
                f.split('=').next().unwrap_or("")
            )
        })?;
        let (k, sub) = match k.split_once('.') {
            Some((k, sub)) if schema.iter().any(|s| s.name == k && s.kind == "map") => (k, Some(sub)),
            _ => (k, None),
        };
        let field_kind = schema
            .iter()
            .find(|s| s.name == k || s.name == "*")
            .map_or("string", |s| s.kind.as_str());
        let value = match (field_kind, sub) {
            (_, Some(sub)) => {
                let m = doc
                    .entry(k.to_owned())
                    .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
                if let Some(m) = m.as_object_mut() {
                    m.insert(sub.to_owned(), serde_json::Value::String(v.to_owned()));
                }
                continue;
            }
            ("bool", None) => match v {
                "true" => serde_json::Value::Bool(true),
                "false" => serde_json::Value::Bool(false),
                _ => anyhow::bail!("--field {k}: true or false"),
            },
            ("json", None) => {
                serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_owned()))
            }
            _ => serde_json::Value::String(v.to_owned()),
        };
        doc.insert(k.to_owned(), value);
    }
    Ok(serde_json::Value::Object(doc))
}

fn block_json(b: &BlockView) -> serde_json::Value {
    serde_json::to_value(b).unwrap_or_default()
}

fn print_blocks(all: &[BlockView], json: bool, one: bool) -> anyhow::Result<()> {
    if json {
        if one && all.len() == 1 {
            println!("{}", block_json(&all[0]));
        } else {
            println!(
                "{}",
                serde_json::Value::Array(all.iter().map(block_json).collect())
            );
        }
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    if one {
        for b in all {
            writeln!(out, "{}/{}  (updated {})", b.kind, b.name, b.updated)?;
            for (k, v) in &b.fields {
                writeln!(
                    out,
                    "  {k} = {}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                )?;
            }
        }
        return Ok(());
    }
    writeln!(out, "{:<10} {:<32} {:<28}", "TYPE", "NAME", "UPDATED")?;
    for b in all {
        writeln!(
            out,
            "{:<10} {:<32} {:<28}",
            b.kind.as_str(),
            b.name,
            b.updated.to_string()
        )?;
    }
    Ok(())
}

fn reference(r: &str) -> anyhow::Result<(BlockType, String)> {
    flotilla_runtime::block::parse_reference(r).map_err(|e| anyhow::anyhow!(e))
}

pub async fn block(cmd: BlockCmd) -> anyhow::Result<bool> {
    match cmd {
        BlockCmd::Types { json, .. } => {
            let all: Vec<_> = BlockType::ALL
                .iter()
                .map(|t| serde_json::json!({ "type": t.as_str(), "fields": t.schema() }))
                .collect();
            if json {
                println!("{}", serde_json::Value::Array(all));
            } else {
                for t in BlockType::ALL {
                    let fields: Vec<String> = t
                        .schema()
                        .iter()
                        .map(|f| {
                            format!(
                                "{}{}{}",
                                f.name,
                                if f.required { "" } else { "?" },
                                if f.secret { " (secret)" } else { "" }
                            )
                        })
                        .collect();
                    println!("{:<8} {}", t.as_str(), fields.join(", "));
                }
            }
        }
        BlockCmd::Create {
            kind,
            name,
            fields,
            json,
            conn,
        } => {
            let kind = BlockType::parse(&kind).map_err(|e| anyhow::anyhow!(e))?;
            let doc = match json.clone().flatten() {
                Some(text) => {
                    anyhow::ensure!(fields.is_empty(), "give --field or --json, not both");
                    let text = match text.strip_prefix('@') {
                        Some(path) => {
                            std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
                        }
                        None => text,
                    };
                    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--json: not JSON: {e}"))?
                }
                None => document(kind, &fields)?,
            };
            let s = conn.connect().await?;
            s.client
                .put_block(kind, &name, doc)
                .await
                .map_err(|e| s.fail(e))?;
            let shown = s
                .client
                .blocks(Some((kind, &name, false)))
                .await
                .map_err(|e| s.fail(e))?;
            if json.is_some() {
                print_blocks(&shown, true, true)?;
            } else {
                println!("{kind}/{name}: stored");
            }
        }
        BlockCmd::Ls { json, conn } => {
            let s = conn.connect().await?;
            let all = s.client.blocks(None).await.map_err(|e| s.fail(e))?;
            print_blocks(&all, json, false)?;
        }
        BlockCmd::Inspect {
            reference: r,
            json,
            conn,
        } => {
            let (kind, name) = reference(&r)?;
            let s = conn.connect().await?;
            let one = s
                .client
                .blocks(Some((kind, &name, false)))
                .await
                .map_err(|e| s.fail(e))?;
            print_blocks(&one, json, true)?;
        }
        BlockCmd::Delete {
            reference: r,
            json,
            conn,
        } => {
            let (kind, name) = reference(&r)?;
            let s = conn.connect().await?;
            s.client
                .blocks(Some((kind, &name, true)))
                .await
                .map_err(|e| s.fail(e))?;
            if json {
                println!("{}", serde_json::json!({ "deleted": r }));
            } else {
                println!("{r}: deleted");
            }
        }
    }
    Ok(true)
}
