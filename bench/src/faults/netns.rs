//! A network namespace joined to the host by a veth pair, for an agent
//! whose network the harness can really cut: with the host's end of the
//! pair down, nothing passes either way, and neither side is told.
//!
//! The host's end has `10.X.N.1/30`, the namespace's end `10.X.N.2/30`,
//! where `X` is a /16 no route of the host uses yet. Needs root
//! (`CAP_NET_ADMIN`) and `ip` from iproute2. Everything is removed when
//! the value is dropped.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context};

/// One namespace and its link to the host.
#[derive(Debug)]
pub struct Netns {
    /// The namespace's name (`ip netns exec <name>`).
    pub name: String,
    host_if: String,
    /// The host's address, as seen from inside.
    pub host_ip: Ipv4Addr,
    /// The namespace's address.
    pub ns_ip: Ipv4Addr,
    cut: bool,
}

/// Runs `ip` with `args`.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A /16 under 10/8 that no route of the host touches, starting the search
/// at `hint`.
pub fn free_block(hint: u8) -> anyhow::Result<u8> {
    let out = Command::new("ip")
        .args(["-4", "route", "show", "table", "all"])
        .output()
        .context("running ip route (install iproute2)")?;
    let routes = String::from_utf8_lossy(&out.stdout);
    let addrs = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .context("running ip addr")?;
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    for k in 0..200u16 {
        let x = 20 + ((u16::from(hint) + k) % 200) as u8;
        let prefix = format!("10.{x}.");
        if !routes.contains(&prefix) && !addrs.contains(&prefix) && !routes.contains("10.0.0.0/8") {
            return Ok(x);
        }
    }
    bail!("no free 10.X.0.0/16 block for the test namespaces")
}

impl Netns {
    /// Creates namespace `name` with link `index` of block `10.<block>/16`.
    /// Interface names are derived from `tag`, which must be short (the
    /// kernel allows 15 bytes).
    ///
    /// # Errors
    /// When `ip` fails (not root, no iproute2); what was made is removed.
    pub fn create(tag: &str, block: u8, index: u8) -> anyhow::Result<Netns> {
        let name = format!("{tag}-{index}");
        let host_if = format!("{tag}h{index}");
        let ns_if = format!("{tag}n{index}");
        if host_if.len() > 15 {
            bail!("interface name {host_if} is longer than 15 bytes");
        }
        let host_ip = Ipv4Addr::new(10, block, index, 1);
        let ns_ip = Ipv4Addr::new(10, block, index, 2);
        // Leftovers of an earlier run of the same name.
        let _ = ip(&["link", "del", &host_if]);
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let made = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip,
            ns_ip,
            cut: false,
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", name.as_str(), "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if])?;
        inside(&["link", "set", &ns_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(made)
    }

    /// The argv prefix that runs a program inside: `ip netns exec <name>`.
    /// `ip` execs the program, so the pid it gets is the program's.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec!["netns".into(), "exec".into(), self.name.clone()]
    }

    /// Cuts the link: the host's end goes down.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn cut(&mut self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, "down"])?;
        self.cut = true;
        Ok(())
    }

    /// Restores the link.
    ///
    /// # Errors
    /// When `ip` fails.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, "up"])?;
        self.cut = false;
        Ok(())
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.cut
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
