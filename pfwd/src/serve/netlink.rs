//! Follows the kernel's link and IPv4 address notifications (rtnetlink multicast groups) for `pfwd serve`: any of
//! them makes the agent compare the attached interfaces with the devices that exist now
//! ([`crate::control::follow_interfaces`]).

use anyhow::Result;
use futures::StreamExt;
use rtnetlink::{
    constants::{RTMGRP_IPV4_IFADDR, RTMGRP_LINK},
    sys::{AsyncSocket, SocketAddr},
};
use tokio::sync::mpsc::UnboundedSender;

use super::Trigger;

/// Subscribes (in the calling thread's network namespace) and forwards every notification as [`Trigger::Links`].
pub(super) fn spawn(tx: UnboundedSender<Trigger>) -> Result<()> {
    let (mut conn, handle, mut messages) = rtnetlink::new_connection()?;
    conn.socket_mut().socket_mut().bind(&SocketAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))?;
    tokio::spawn(conn);
    tokio::spawn(async move {
        let _keep_the_connection = handle;
        while messages.next().await.is_some() {
            if tx.send(Trigger::Links).is_err() {
                return;
            }
        }
        log::warn!("the netlink event stream ended; interface changes are no longer followed");
    });
    Ok(())
}
