//! Where a pool keeps what in etcd. Every key of pool `P` starts with `/tern/P/`:
//!
//! | key                     | value        | written by                  | lease        |
//! |-------------------------|--------------|-----------------------------|--------------|
//! | `hosts/<host>`          | [`HostRecord`](crate::HostRecord) | that host's daemon | none: a host that went away is shown down |
//! | `alive/<host>`          | empty               | that host's daemon          | the host's   |
//! | `maintenance/<host>`    | why, when    | `tern host evacuate`        | none         |
//! | `guests/<uuid>`         | [`GuestRecord`](crate::GuestRecord): the owner | the owning host's daemon | none |
//! | `on/<host>/<uuid>`      | the same [`GuestRecord`](crate::GuestRecord) | with `guests/<uuid>`, in the same transaction | none |
//!
//! `on/<host>/` is the index that makes "the guests of one host" one short range instead of a
//! scan of every guest of the pool; it holds the records themselves, so that planning an
//! evacuation reads one prefix.

/// The keys of one pool.
#[derive(Clone, Debug)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(pool: &str) -> Keys {
        Keys {
            root: format!("/tern/{pool}/"),
        }
    }

    pub fn hosts(&self) -> String {
        format!("{}hosts/", self.root)
    }

    pub fn host(&self, host: &str) -> String {
        format!("{}{host}", self.hosts())
    }

    pub fn alive_all(&self) -> String {
        format!("{}alive/", self.root)
    }

    pub fn alive(&self, host: &str) -> String {
        format!("{}{host}", self.alive_all())
    }

    pub fn maintenance_all(&self) -> String {
        format!("{}maintenance/", self.root)
    }

    pub fn maintenance(&self, host: &str) -> String {
        format!("{}{host}", self.maintenance_all())
    }

    pub fn guests(&self) -> String {
        format!("{}guests/", self.root)
    }

    pub fn guest(&self, uuid: &str) -> String {
        format!("{}{uuid}", self.guests())
    }

    pub fn on_host(&self, host: &str) -> String {
        format!("{}on/{host}/", self.root)
    }

    pub fn on(&self, host: &str, uuid: &str) -> String {
        format!("{}{uuid}", self.on_host(host))
    }

    /// The last path element of `key` (a host name or a UUID).
    pub fn leaf(key: &str) -> &str {
        key.rsplit('/').next().unwrap_or(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nest_under_the_pool() {
        let k = Keys::new("lab");
        assert_eq!(k.guest("u1"), "/tern/lab/guests/u1");
        assert_eq!(k.on("host1", "u1"), "/tern/lab/on/host1/u1");
        assert!(k.on("host1", "u1").starts_with(&k.on_host("host1")));
        assert_eq!(Keys::leaf(&k.alive("host2")), "host2");
    }
}
