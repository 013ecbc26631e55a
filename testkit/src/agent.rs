//! A node agent played by a test over a real WebSocket: JSON frames as the
//! protocol writes them, so a test can send what the real agent would and
//! what it never would.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long [`JsonAgent::recv`] waits for a frame.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A WebSocket to the ingress.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Dials the ingress at `addr` with `token` as the bearer, if any; `Err`
/// holds the HTTP status and body of a refusal.
///
/// # Panics
/// When the connection fails for another reason than a refusal.
pub async fn dial(addr: SocketAddr, token: Option<&str>) -> Result<Ws, (u16, String)> {
    let mut request = format!("ws://{addr}{}", protocol::PATH)
        .into_client_request()
        .unwrap_or_else(|e| panic!("a WebSocket request to {addr}: {e}"));
    if let Some(token) = token {
        let bearer = format!("Bearer {token}")
            .parse()
            .unwrap_or_else(|e| panic!("a token fit for a header: {e}"));
        request.headers_mut().insert("authorization", bearer);
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((response.status().as_u16(), body))
        }
        Err(e) => panic!("dialling the ingress failed: {e}"),
    }
}

/// The hello of a node with 4 CPUs, 4 GiB and no GPU that says it still
/// runs `running` (`[{"task_id", "attempt"}]`).
pub fn hello(running: Value) -> Value {
    json!({"type": "hello", "agent_version": "0.1.0-test",
           "resources": {"cpus": 4.0, "memory_mb": 4096, "gpus": []},
           "labels": {}, "running": running, "cache": {"images": [], "commits": []}})
}

/// The agent side of one session.
pub struct JsonAgent {
    /// The WebSocket.
    pub ws: Ws,
    next_id: u64,
}

impl JsonAgent {
    /// Dials with `token`, says [`hello`] with `running` and waits for the
    /// welcome, passing over the commands sent before it.
    ///
    /// # Panics
    /// When the ingress refuses the session or answers anything else.
    pub async fn join(addr: SocketAddr, token: &str, running: Value) -> JsonAgent {
        JsonAgent::join_with(addr, token, hello(running)).await
    }

    /// Like [`JsonAgent::join`], saying `hello` (a node declaring other
    /// resources or labels than [`hello`]'s).
    ///
    /// # Panics
    /// When the ingress refuses the session or answers anything else.
    pub async fn join_with(addr: SocketAddr, token: &str, hello: Value) -> JsonAgent {
        let ws = dial(addr, Some(token))
            .await
            .unwrap_or_else(|(status, body)| panic!("the ingress refused: {status} {body}"));
        let mut agent = JsonAgent { ws, next_id: 1 };
        agent.send(hello).await;
        loop {
            let frame = agent.recv().await;
            if frame["type"] == "welcome" {
                return agent;
            }
            assert_eq!(frame["type"], "command", "before welcome: {frame}");
        }
    }

    /// Sends `message` with the protocol version.
    ///
    /// # Panics
    /// When the connection is gone.
    pub async fn send(&mut self, mut message: Value) {
        message["protocol"] = json!(protocol::VERSION);
        if let Err(e) = self
            .ws
            .send(Message::Text(message.to_string().into()))
            .await
        {
            panic!("sending a frame: {e}");
        }
    }

    /// The next JSON frame from the server, waiting at most [`PATIENCE`].
    ///
    /// # Panics
    /// When none comes in time, the connection ends or the frame is not JSON.
    pub async fn recv(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("the connection is open")
                .unwrap_or_else(|e| panic!("reading a frame: {e}"));
            match frame {
                Message::Text(text) => {
                    return serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("a JSON frame: {e}: {text}"))
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Numbers the next reports from `id` on, as an agent that restarted
    /// with ids of its own would.
    pub fn number_reports_from(&mut self, id: u64) {
        self.next_id = id;
    }

    /// Sends `report` under the next id without waiting; returns the id.
    pub async fn send_report(&mut self, mut report: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        report["id"] = json!(id);
        self.send(report).await;
        id
    }

    /// The answer to report `id`, passing over commands: `None` when it
    /// was stored, the error when it was refused for good.
    ///
    /// # Panics
    /// When another frame comes first.
    pub async fn received(&mut self, id: u64) -> Option<String> {
        loop {
            let frame = self.recv().await;
            if frame["type"] == "command" {
                continue;
            }
            assert_eq!(frame["type"], "received", "{frame}");
            assert_eq!(frame["id"], id, "{frame}");
            return frame["error"].as_str().map(str::to_string);
        }
    }

    /// Sends `report` and waits until the server has stored it.
    ///
    /// # Panics
    /// When the server refuses it.
    pub async fn report(&mut self, report: Value) {
        let id = self.send_report(report).await;
        if let Some(error) = self.received(id).await {
            panic!("report {id} refused: {error}");
        }
    }

    /// Closes the session cleanly.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
