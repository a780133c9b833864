//! The record: what `pfwd detach` must undo that it cannot discover from the kernel (the earlier values of the sysctls
//! pfwd changed, and the iptables tables it created), kept with the data path itself as well as in the state file.
//! So a detach finds it even when the state directory is gone (deleted by hand, or by a cleanup of /run): in eBPF
//! mode in a pinned map (`PFWD_RECORD`), in iptables mode as comments in a chain nothing jumps to (`PFWD-RECORD`).
//! It is written before the changes it describes, like the state's intent.
use serde::{Deserialize, Serialize};

use crate::state::SavedSysctl;

/// Comments in the iptables record start with this.
pub const COMMENT_PREFIX: &str = "pfwd-record";
/// The iptables chain holding the record (in the nat table; it carries pfwd's chain prefix, so it goes with them).
pub const CHAIN: &str = "PFWD-RECORD";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Sysctls pfwd changed, with their values before.
    pub sysctls: Vec<(String, String)>,
    /// iptables tables that did not exist before attach.
    pub created_tables: Vec<String>,
}

impl Record {
    pub fn new(sysctls: &[SavedSysctl], created_tables: &[String]) -> Self {
        Record {
            sysctls: sysctls.iter().map(|s| (s.key.clone(), s.previous.clone())).collect(),
            created_tables: created_tables.to_vec(),
        }
    }

    /// The sysctls as saved ones, to restore.
    pub fn saved_sysctls(&self) -> Vec<SavedSysctl> {
        self.sysctls
            .iter()
            .map(|(key, previous)| SavedSysctl {
                key: key.clone(),
                previous: previous.clone(),
                reason: "recorded with the data path".into(),
            })
            .collect()
    }

    /// The record as `iptables-restore` input for the nat table: one comment per item (each well under iptables'
    /// 256-character comment limit: sysctl keys and values are short).
    pub fn iptables_script(&self) -> String {
        let mut out = format!("*nat\n:{CHAIN} - [0:0]\n");
        let items = self
            .sysctls
            .iter()
            .map(|(k, v)| format!("sysctl {k} {v}"))
            .chain(self.created_tables.iter().map(|t| format!("table {t}")));
        for item in items {
            out.push_str(&format!("-A {CHAIN} -m comment --comment \"{COMMENT_PREFIX} {item}\" -j RETURN\n"));
        }
        out.push_str("COMMIT\n");
        out
    }

    /// The record found in `iptables-save` output, if the chain is there.
    pub fn from_iptables_save(dump: &str) -> Option<Self> {
        if !dump.lines().any(|l| l.strip_prefix(':').is_some_and(|c| c.split_whitespace().next() == Some(CHAIN))) {
            return None;
        }
        let mut rec = Record::default();
        for line in dump.lines().filter(|l| l.starts_with(&format!("-A {CHAIN} "))) {
            // `... --comment "pfwd-record ITEM" -j RETURN`: the item runs to the closing quote.
            let Some(item) = line.split_once(COMMENT_PREFIX).and_then(|(_, rest)| rest.split('"').next()) else {
                continue;
            };
            let words: Vec<&str> = item.split_whitespace().collect();
            match words.as_slice() {
                ["sysctl", key, value] => rec.sysctls.push((key.to_string(), value.to_string())),
                ["table", t] => rec.created_tables.push(t.to_string()),
                _ => {}
            }
        }
        Some(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_record_round_trips_through_iptables_save_form() {
        let rec = Record {
            sysctls: vec![
                ("net/ipv4/ip_forward".into(), "0".into()),
                ("net/ipv4/conf/eth0/route_localnet".into(), "0".into()),
            ],
            created_tables: vec!["nat".into(), "filter".into()],
        };
        // What iptables-save prints back for the script (the table header and counters added, comments kept).
        let save: String = rec
            .iptables_script()
            .lines()
            .map(|l| if l.starts_with(':') { format!("{l}\n:PREROUTING ACCEPT [0:0]\n") } else { format!("{l}\n") })
            .collect();
        assert_eq!(Record::from_iptables_save(&save), Some(rec));
        assert_eq!(Record::from_iptables_save("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"), None);
    }
}
