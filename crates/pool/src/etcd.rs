//! A small synchronous etcd v3 client over etcd's JSON gateway (`/v3/kv/range`, `/v3/kv/txn`,
//! `/v3/lease/…`): every member serves it on its client URLs, with the same TLS as gRPC.
//! The daemon is threads, not an async runtime, and needs a handful of calls: ranges, puts,
//! deletes, transactions and leases.
//!
//! Keys and values travel base64-encoded and 64-bit integers as strings; fields at their
//! default value are left out of answers, so every one of them is optional here.
//!
//! A call goes to the endpoint that answered last and, if it cannot be reached, to the others
//! in turn. A write whose answer was lost may still have been applied: callers make their
//! writes checkable (a transaction on a revision, a value naming the writer) and read back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

/// How a call to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered (the last reason given).
    #[error("cannot reach etcd ({endpoints}): {reason}")]
    Unreachable { endpoints: String, reason: String },
    /// etcd answered with an error.
    #[error("etcd refused {call}: {message}")]
    Refused { call: String, message: String },
    /// The answer was not what etcd sends.
    #[error("malformed answer from etcd to {call}: {reason}")]
    Malformed { call: String, reason: String },
    /// The TLS files could not be used.
    #[error("etcd TLS: {0}")]
    Tls(String),
}

impl EtcdError {
    /// Whether etcd may not have seen the request at all (or its answer was lost).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, EtcdError::Unreachable { .. })
    }
}

/// TLS to etcd: the CA that signed the members' certificates and, for etcd with
/// `--client-cert-auth`, this host's client certificate.
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

/// One key and its value as etcd holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct KeyValue {
    #[serde(deserialize_with = "b64_string")]
    pub key: String,
    #[serde(deserialize_with = "b64_bytes")]
    pub value: Vec<u8>,
    #[serde(deserialize_with = "int_string")]
    pub create_revision: i64,
    #[serde(deserialize_with = "int_string")]
    pub mod_revision: i64,
    #[serde(deserialize_with = "int_string")]
    pub lease: i64,
}

/// A condition of a transaction.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key exists.
    Exists(String),
    /// The key does not exist.
    Absent(String),
    /// The key was last written at this revision.
    ModRevision(String, i64),
}

/// An operation of a transaction.
#[derive(Clone, Debug)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        /// Deleted with this lease; 0 for none.
        lease: i64,
    },
    Delete(String),
    Get(String),
}

/// A transaction: if every condition holds, `then`, else `otherwise`.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    pub when: Vec<Compare>,
    pub then: Vec<Op>,
    pub otherwise: Vec<Op>,
}

/// What a transaction did: which branch, and the keys its `Get`s found, in order.
#[derive(Clone, Debug, Default)]
pub struct TxnResult {
    pub succeeded: bool,
    pub gets: Vec<Option<KeyValue>>,
}

/// A client of one etcd cluster.
pub struct Etcd {
    endpoints: Vec<String>,
    agent: ureq::Agent,
    /// The endpoint to try first: the one that answered last.
    preferred: AtomicUsize,
}

/// How many keys one range request returns at most: large prefixes come in pages, so that no
/// answer is unbounded.
const PAGE: usize = 2000;

impl Etcd {
    /// A client of the cluster at `endpoints` (`http://host:port` or `https://…`); each call
    /// may take `timeout` per endpoint.
    pub fn new(
        endpoints: &[String],
        tls: Option<&EtcdTls>,
        timeout: Duration,
    ) -> Result<Etcd, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::Unreachable {
                endpoints: String::new(),
                reason: "no endpoints given".into(),
            });
        }
        let mut config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .timeout_connect(Some(timeout.min(Duration::from_secs(2))))
            .http_status_as_error(false)
            .proxy(None)
            .max_idle_connections_per_host(4);
        if let Some(tls) = tls {
            config = config.tls_config(tls_config(tls)?);
        }
        Ok(Etcd {
            endpoints: endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            agent: config.build().into(),
            preferred: AtomicUsize::new(0),
        })
    }

    /// The value of `key`, if it exists (a linearizable read).
    pub fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let answer: RangeAnswer = self.call("/v3/kv/range", &json!({ "key": b64(key) }))?;
        Ok(answer.kvs.into_iter().next())
    }

    /// Every key under `prefix`, in key order, read in pages at one revision.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, EtcdError> {
        let end = prefix_end(prefix);
        let mut all = Vec::new();
        let mut from = prefix.to_string();
        let mut revision: Option<i64> = None;
        loop {
            let mut body = json!({
                "key": b64(&from),
                "range_end": B64.encode(&end),
                "limit": PAGE.to_string(),
            });
            if let Some(rev) = revision {
                body["revision"] = json!(rev.to_string());
            }
            let answer: RangeAnswer = self.call("/v3/kv/range", &body)?;
            revision.get_or_insert(answer.header.revision);
            let last = answer.kvs.last().map(|kv| kv.key.clone());
            all.extend(answer.kvs);
            match (answer.more, last) {
                (true, Some(last)) => from = last + "\0",
                _ => return Ok(all),
            }
        }
    }

    /// Sets `key` to `value`, deleted with `lease` (0: kept).
    pub fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        let _: Value = self.call("/v3/kv/put", &put_body(key, value, lease))?;
        Ok(())
    }

    /// Deletes `key` (nothing if it does not exist).
    pub fn delete(&self, key: &str) -> Result<(), EtcdError> {
        let _: Value = self.call("/v3/kv/deleterange", &json!({ "key": b64(key) }))?;
        Ok(())
    }

    /// Runs a transaction.
    pub fn txn(&self, txn: &Txn) -> Result<TxnResult, EtcdError> {
        let body = json!({
            "compare": txn.when.iter().map(compare_body).collect::<Vec<_>>(),
            "success": txn.then.iter().map(op_body).collect::<Vec<_>>(),
            "failure": txn.otherwise.iter().map(op_body).collect::<Vec<_>>(),
        });
        let answer: TxnAnswer = self.call("/v3/kv/txn", &body)?;
        let gets = answer
            .responses
            .into_iter()
            .filter_map(|r| r.response_range)
            .map(|r| r.kvs.into_iter().next())
            .collect();
        Ok(TxnResult {
            succeeded: answer.succeeded,
            gets,
        })
    }

    /// A new lease of `ttl_s` seconds; its ID.
    pub fn grant(&self, ttl_s: i64) -> Result<i64, EtcdError> {
        let answer: LeaseAnswer =
            self.call("/v3/lease/grant", &json!({ "TTL": ttl_s.to_string() }))?;
        if answer.id == 0 {
            return Err(malformed("/v3/lease/grant", "no lease ID"));
        }
        Ok(answer.id)
    }

    /// Renews lease `id`; the seconds it has left, 0 if it expired.
    pub fn keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        // A stream in gRPC: one request, one answer line here.
        let answer: KeepAliveAnswer =
            self.call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))?;
        Ok(answer.result.ttl.max(0))
    }

    /// Ends lease `id`: its keys are deleted.
    pub fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        let _: Value = self.call("/v3/lease/revoke", &json!({ "ID": id.to_string() }))?;
        Ok(())
    }

    /// Posts `body` to `path` on the preferred endpoint, then the others.
    fn call<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, EtcdError> {
        let first = self.preferred.load(Ordering::Relaxed) % self.endpoints.len();
        let mut reason = String::new();
        for i in 0..self.endpoints.len() {
            let index = (first + i) % self.endpoints.len();
            let url = format!("{}{path}", self.endpoints[index]);
            match self.agent.post(&url).send_json(body) {
                Ok(mut response) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    let status = response.status();
                    let text = response
                        .body_mut()
                        .with_config()
                        .limit(64 << 20)
                        .read_to_string()
                        .map_err(|e| malformed(path, &e.to_string()))?;
                    return decode(path, status.as_u16(), &text);
                }
                Err(e) => reason = format!("{}: {e}", self.endpoints[index]),
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints.join(", "),
            reason,
        })
    }
}

/// The answer's body as `T`, or etcd's error.
fn decode<T: DeserializeOwned>(path: &str, status: u16, text: &str) -> Result<T, EtcdError> {
    // Streamed calls (lease keep-alive) answer one JSON object per line.
    let first = text.lines().next().unwrap_or("");
    let value: Value = serde_json::from_str(first).map_err(|e| malformed(path, &e.to_string()))?;
    let error = value.get("error").or_else(|| value.get("message"));
    if status != 200 || error.is_some() {
        let message = error
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP status {status}"));
        return Err(EtcdError::Refused {
            call: path.to_string(),
            message,
        });
    }
    serde_json::from_value(value).map_err(|e| malformed(path, &e.to_string()))
}

fn malformed(call: &str, reason: &str) -> EtcdError {
    EtcdError::Malformed {
        call: call.to_string(),
        reason: reason.to_string(),
    }
}

fn tls_config(tls: &EtcdTls) -> Result<ureq::tls::TlsConfig, EtcdError> {
    use ureq::tls::{ClientCert, PrivateKey, RootCerts, TlsConfig};
    let roots = pem_certs(&tls.ca_pem)?;
    if roots.is_empty() {
        return Err(EtcdError::Tls("the CA file holds no certificate".into()));
    }
    let mut builder = TlsConfig::builder().root_certs(RootCerts::new_with_certs(&roots));
    if let Some((cert, key)) = &tls.client {
        let chain = pem_certs(cert)?;
        if chain.is_empty() {
            return Err(EtcdError::Tls(
                "the certificate file holds no certificate".into(),
            ));
        }
        let key = PrivateKey::from_pem(key)
            .map_err(|e| EtcdError::Tls(format!("bad private key: {e}")))?;
        builder = builder.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
    }
    Ok(builder.build())
}

/// The certificates in a PEM file.
fn pem_certs(pem: &[u8]) -> Result<Vec<ureq::tls::Certificate<'static>>, EtcdError> {
    use ureq::tls::PemItem;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item.map_err(|e| EtcdError::Tls(format!("bad PEM: {e}")))? {
            PemItem::Certificate(c) => certs.push(c),
            _ => continue,
        }
    }
    Ok(certs)
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// The end of the range of keys starting with `prefix`: the prefix with its last byte
/// incremented (bytes 0xff dropped first).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every key: "\0" means "to the end" to etcd.
    vec![0]
}

fn put_body(key: &str, value: &[u8], lease: i64) -> Value {
    let mut body = json!({ "key": b64(key), "value": B64.encode(value) });
    if lease != 0 {
        body["lease"] = json!(lease.to_string());
    }
    body
}

fn compare_body(c: &Compare) -> Value {
    match c {
        Compare::Exists(key) => json!({
            "target": "CREATE", "key": b64(key), "create_revision": "0", "result": "GREATER"
        }),
        Compare::Absent(key) => json!({
            "target": "CREATE", "key": b64(key), "create_revision": "0", "result": "EQUAL"
        }),
        Compare::ModRevision(key, rev) => json!({
            "target": "MOD", "key": b64(key), "mod_revision": rev.to_string(), "result": "EQUAL"
        }),
    }
}

fn op_body(op: &Op) -> Value {
    match op {
        Op::Put { key, value, lease } => json!({ "request_put": put_body(key, value, *lease) }),
        Op::Delete(key) => json!({ "request_delete_range": { "key": b64(key) } }),
        Op::Get(key) => json!({ "request_range": { "key": b64(key) } }),
    }
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Header {
    #[serde(deserialize_with = "int_string")]
    revision: i64,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RangeAnswer {
    header: Header,
    kvs: Vec<KeyValue>,
    more: bool,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct TxnAnswer {
    succeeded: bool,
    responses: Vec<TxnResponse>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct TxnResponse {
    response_range: Option<RangeAnswer>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct LeaseAnswer {
    #[serde(rename = "ID", deserialize_with = "int_string")]
    id: i64,
    #[serde(rename = "TTL", deserialize_with = "int_string")]
    ttl: i64,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct KeepAliveAnswer {
    result: LeaseAnswer,
}

/// A 64-bit integer, which the gateway sends as a string (and sometimes a number).
fn int_string<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::String(s) => s.parse().map_err(D::Error::custom),
        Value::Number(n) => n.as_i64().ok_or_else(|| D::Error::custom("not an integer")),
        Value::Null => Ok(0),
        other => Err(D::Error::custom(format!(
            "expected an integer, got {other}"
        ))),
    }
}

fn b64_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    use serde::de::Error;
    let s = String::deserialize(d)?;
    B64.decode(s).map_err(D::Error::custom)
}

fn b64_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    String::from_utf8(b64_bytes(d)?).map_err(D::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_increment_the_last_byte() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn answers_decode_with_defaults_left_out() {
        let text = r#"{"header":{"revision":"7"},"kvs":[{"key":"L2E=","mod_revision":"5","value":"aGk="}],"count":"1"}"#;
        let r: RangeAnswer = decode("/v3/kv/range", 200, text).unwrap();
        assert_eq!(r.header.revision, 7);
        assert_eq!(r.kvs[0].key, "/a");
        assert_eq!(r.kvs[0].value, b"hi");
        assert_eq!(r.kvs[0].mod_revision, 5);
        assert_eq!(r.kvs[0].create_revision, 0);
        assert!(!r.more);
        let e = decode::<RangeAnswer>("/v3/kv/range", 400, r#"{"error":"bad","code":3}"#);
        assert!(matches!(e, Err(EtcdError::Refused { message, .. }) if message == "bad"));
        assert!(decode::<RangeAnswer>("/v3/kv/range", 200, "<html>").is_err());
    }
}
