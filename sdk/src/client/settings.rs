//! The client's requests about automations and blocks.

use flotilla_cluster::wire::{Request, Response};

use super::Client;
use crate::error::Error;

impl Client {
    /// Creates or replaces automations, all of them or none: how many were created and how
    /// many changed.
    pub async fn put_automations(
        &self,
        specs: Vec<flotilla_runtime::automation::AutomationSpec>,
    ) -> Result<(u32, u32), Error> {
        match self
            .remote_only()?
            .request(Request::PutAutomations(specs))
            .await?
        {
            Response::SettingsPut { created, updated } => Ok((created, updated)),
            other => Err(Error::Unavailable(format!("an unexpected answer: {other:?}"))),
        }
    }

    /// Every automation (with its last firings), or one after a change (None after a
    /// deletion).
    pub async fn automations(
        &self,
        one: Option<(&str, flotilla_cluster::wire::AutomationChange)>,
    ) -> Result<Vec<flotilla_runtime::automation::AutomationRecord>, Error> {
        let request = match one {
            Some((name, change)) => Request::Automation {
                name: name.to_owned(),
                change,
            },
            None => Request::Automations,
        };
        match self.remote_only()?.request(request).await? {
            Response::Automations(all) => Ok(all),
            Response::Done => Ok(Vec::new()),
            other => Err(Error::Unavailable(format!("an unexpected answer: {other:?}"))),
        }
    }

    /// Creates or replaces a block (its secret fields sealed by the control node).
    pub async fn put_block(
        &self,
        kind: flotilla_runtime::block::BlockType,
        name: &str,
        fields: serde_json::Value,
    ) -> Result<bool, Error> {
        let request = Request::PutBlock {
            kind,
            name: name.to_owned(),
            fields,
        };
        match self.remote_only()?.request(request).await? {
            Response::SettingsPut { created, .. } => Ok(created > 0),
            Response::Done => Ok(false),
            other => Err(Error::Unavailable(format!("an unexpected answer: {other:?}"))),
        }
    }

    /// Every block (masked), or one (`delete`: deletes it and answers none).
    pub async fn blocks(
        &self,
        one: Option<(flotilla_runtime::block::BlockType, &str, bool)>,
    ) -> Result<Vec<flotilla_cluster::wire::BlockView>, Error> {
        let request = match one {
            Some((kind, name, delete)) => Request::Block {
                kind,
                name: name.to_owned(),
                delete,
            },
            None => Request::Blocks,
        };
        match self.remote_only()?.request(request).await? {
            Response::Blocks(all) => Ok(all),
            Response::Done => Ok(Vec::new()),
            other => Err(Error::Unavailable(format!("an unexpected answer: {other:?}"))),
        }
    }
}

#[cfg(test)]
mod request_id_tests {
    use super::super::{now, rng};
    use flotilla_runtime::FlowRunId;

    /// Request ids made at once on several threads never repeat (they were once seeded by the
    /// clock, and two requests of one tick got one id: the second was answered as the first).
    #[test]
    fn ids_made_at_once_on_many_threads_are_unique() {
        let threads: Vec<_> = (0..8)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..20_000)
                        .map(|_| FlowRunId::new(now(), &mut rng()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = std::collections::HashSet::new();
        for t in threads {
            for id in t.join().expect("a thread") {
                assert!(all.insert(id), "id {id} made twice");
            }
        }
    }
}
