//! A minimal Chrome DevTools Protocol client for browser tests: one headless Chromium and one websocket per
//! [`Browser`], one flattened session per [`Page`]. A reader task routes answers (messages with an `id`) to
//! their callers and records events (with a `method` and a `sessionId`) in their session's [`SessionEvents`].
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const CALL_TIMEOUT: Duration = Duration::from_secs(30); // for the answer to one command
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30); // for Chromium's DevTools URL
const GOTO_TIMEOUT: Duration = Duration::from_secs(15); // for a navigated document to be complete
const ELEMENT_TIMEOUT: Duration = Duration::from_secs(10); // for an element helper's element to be visible
const POLL: Duration = Duration::from_millis(50);

/// Chromium's flags besides `--user-data-dir` and the initial URL.
const FLAGS: &str = "--headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --remote-debugging-port=0 \
    --no-first-run --no-default-browser-check --disable-background-networking --disable-component-update \
    --disable-sync --disable-default-apps --disable-extensions --disable-features=Translate,MediaRouter,OptimizationHints \
    --metrics-recording-only --password-store=basic --use-mock-keychain --window-size=1280,900";

/// Whether an element (`el`, possibly null) exists and is rendered.
const VISIBLE_JS: &str = "el => !!el && (el === document.body || el.offsetParent !== null \
    || (getComputedStyle(el).position === 'fixed' && el.getClientRects().length > 0))";
/// Scrolls `el` into view and returns the viewport coordinates of its centre.
const CENTER_JS: &str = "el => { el.scrollIntoView({block: 'center', inline: 'center', behavior: 'instant'}); \
    const r = el.getBoundingClientRect(); return {x: r.left + r.width / 2, y: r.top + r.height / 2}; }";
/// Focuses `el` and empties it if it is an input or a textarea; false when there is no `el`.
const FOCUS_AND_CLEAR_JS: &str = "el => { if (!el) return false; el.focus(); \
    if (el instanceof HTMLInputElement || el instanceof HTMLTextAreaElement) { \
    el.select(); el.value = ''; el.dispatchEvent(new Event('input', {bubbles: true})); } return true; }";
/// Sets the `<select>` `el` to the value `v`; null on success, else what went wrong.
const SELECT_JS: &str = "(el, v) => { if (!(el instanceof HTMLSelectElement)) return 'no <select> matches'; \
    const values = [...el.options].map(o => o.value); \
    if (!values.includes(v)) return 'no option has the value ' + JSON.stringify(v) + '; values: ' + JSON.stringify(values); \
    el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); \
    el.dispatchEvent(new Event('change', {bubbles: true})); return null; }";
/// The text content of `el`, or null.
const TEXT_JS: &str = "el => el ? el.textContent : null";

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Response = (String, u16, BTreeMap<String, String>);

/// Locks a std mutex, ignoring poisoning (a panicking test must not hide the browser's state).
fn lock<T>(mutex: &StdMutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What one session's events recorded so far.
#[derive(Default)]
struct SessionEvents {
    requests: Vec<String>,
    errors: Vec<String>,
    responses: Vec<Response>,
}

/// The websocket to the browser, shared by the [`Browser`] and its pages.
struct Connection {
    writer: Mutex<SplitSink<Ws, Message>>,
    next_id: AtomicU64,
    pending: StdMutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>,
    sessions: StdMutex<HashMap<String, Arc<StdMutex<SessionEvents>>>>,
}

impl Connection {
    /// Sends one command (to a session's target when `session` is given) and waits for its answer.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = session.into();
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        if let Err(e) = self.writer.lock().await.send(Message::text(message.to_string())).await {
            lock(&self.pending).remove(&id);
            bail!("{method}: sending failed: {e}");
        }
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(Ok(result))) => Ok(result),
            Ok(Ok(Err(error))) => bail!("{method}: {error}"),
            Ok(Err(_)) => bail!("{method}: the connection to the browser is closed"),
            Err(_) => {
                lock(&self.pending).remove(&id);
                bail!("{method}: no answer within {CALL_TIMEOUT:?}")
            }
        }
    }

    /// The event record of a session, created on first use (by the reader or by [`Browser::new_page`]).
    fn events(&self, session: &str) -> Arc<StdMutex<SessionEvents>> {
        Arc::clone(lock(&self.sessions).entry(session.to_owned()).or_default())
    }

    /// Routes one message from the browser: an answer to its caller, an event to its session.
    fn dispatch(&self, message: &Value) {
        if let Some(id) = message.get("id").and_then(Value::as_u64) {
            let Some(tx) = lock(&self.pending).remove(&id) else { return };
            let result = match message.get("error") {
                Some(error) => {
                    let text = error["message"].as_str().map_or_else(|| error.to_string(), str::to_owned);
                    Err(match error["data"].as_str() {
                        Some(data) => format!("{text}: {data}"),
                        None => text,
                    })
                }
                None => Ok(message.get("result").cloned().unwrap_or_default()),
            };
            let _ = tx.send(result);
        } else if let (Some(method), Some(session)) = (message["method"].as_str(), message["sessionId"].as_str()) {
            record(&mut lock(&self.events(session)), method, &message["params"]);
        }
    }
}

/// Reads the websocket until it closes, then fails every call still waiting.
async fn read_loop(conn: Arc<Connection>, mut stream: SplitStream<Ws>) {
    while let Some(message) = stream.next().await {
        match message {
            Ok(Message::Text(text)) => {
                if let Ok(value) = serde_json::from_str::<Value>(text.as_str()) {
                    conn.dispatch(&value);
                }
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    for tx in std::mem::take(&mut *lock(&conn.pending)).into_values() {
        let _ = tx.send(Err("the connection to the browser closed".to_owned()));
    }
}

/// Records the events the [`Page`] accessors report.
fn record(events: &mut SessionEvents, method: &str, params: &Value) {
    match method {
        "Network.requestWillBeSent" => {
            if let Some(redirect) = params.get("redirectResponse") {
                events.responses.push(response_entry(redirect));
            }
            if let Some(url) = params["request"]["url"].as_str() {
                events.requests.push(url.to_owned());
            }
        }
        "Network.responseReceived" => events.responses.push(response_entry(&params["response"])),
        "Runtime.consoleAPICalled" => {
            let kind = params["type"].as_str().unwrap_or_default();
            if kind == "error" || kind == "assert" {
                let args = params["args"].as_array().map(|args| args.iter().map(remote_text).collect::<Vec<_>>());
                events.errors.push(format!("console.{kind}: {}", args.unwrap_or_default().join(" ")));
            }
        }
        "Runtime.exceptionThrown" => {
            events.errors.push(format!("uncaught exception: {}", exception_text(&params["exceptionDetails"])));
        }
        "Log.entryAdded" => {
            let entry = &params["entry"];
            // Console API messages already arrive as Runtime.consoleAPICalled.
            if entry["level"] == "error" && entry["source"] != "console-api" {
                let source = entry["source"].as_str().unwrap_or("log");
                let text = entry["text"].as_str().unwrap_or_default();
                let url = entry["url"].as_str().map(|url| format!(" ({url})")).unwrap_or_default();
                events.errors.push(format!("{source}: {text}{url}"));
            }
        }
        _ => {}
    }
}

/// (url, status, headers with lowercase names) of a CDP `Network.Response`.
fn response_entry(response: &Value) -> Response {
    let url = response["url"].as_str().unwrap_or_default().to_owned();
    let status = response["status"].as_u64().and_then(|s| u16::try_from(s).ok()).unwrap_or_default();
    let headers = response["headers"].as_object().map(|headers| {
        headers
            .iter()
            .map(|(name, value)| {
                (name.to_ascii_lowercase(), value.as_str().map_or_else(|| value.to_string(), str::to_owned))
            })
            .collect()
    });
    (url, status, headers.unwrap_or_default())
}

/// The text of a CDP `Runtime.ExceptionDetails`.
fn exception_text(details: &Value) -> String {
    let exception = &details["exception"];
    exception["description"]
        .as_str()
        .or_else(|| exception["value"].as_str())
        .or_else(|| details["text"].as_str())
        .unwrap_or("unknown exception")
        .to_owned()
}

/// The text of a CDP `Runtime.RemoteObject` (a console argument).
fn remote_text(object: &Value) -> String {
    match &object["value"] {
        Value::String(s) => s.clone(),
        Value::Null => ["description", "unserializableValue", "subtype", "type"]
            .into_iter()
            .find_map(|key| object[key].as_str())
            .unwrap_or_default()
            .to_owned(),
        value => value.to_string(),
    }
}

/// Whether a JSON value is truthy as [`Page::wait_for`] means it: not null, false, 0 or "".
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f.abs() > 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// `(function)(document.querySelector(selector), arg)`: one expression calling a JS function on an element.
fn on_element(selector: &str, function: &str, arg: &Value) -> String {
    let selector = Value::from(selector);
    format!("({function})(document.querySelector({selector}), {arg})")
}

/// Reads Chromium's stderr: sends the DevTools URL (or, if stderr ends first, what it printed),
/// then drains the rest so the pipe never fills.
fn read_stderr(stderr: ChildStderr, url_tx: oneshot::Sender<Result<String, String>>) {
    const MARK: &str = "DevTools listening on ";
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    let mut seen = String::new();
    let mut url_tx = Some(url_tx);
    while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
        if let Some(tx) = url_tx.take() {
            let text = String::from_utf8_lossy(&line);
            if let Some((_, url)) = text.split_once(MARK) {
                let _ = tx.send(Ok(url.trim().to_owned()));
            } else {
                if seen.len() < 16_384 {
                    seen.push_str(&text);
                }
                url_tx = Some(tx);
            }
        }
        line.clear();
    }
    if let Some(tx) = url_tx {
        let _ = tx.send(Err(seen));
    }
}

/// The browser process, killed (and reaped) when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A headless Chromium with its own profile directory, killed when dropped.
pub struct Browser {
    conn: Arc<Connection>,
    reader: JoinHandle<()>,
    child: ChildGuard,
    /// Removed after the browser is killed (fields drop in order).
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Browser {
    /// Finds Chromium: `$CHROMIUM`, else the first of the usual paths that exists, else
    /// `chromium`, `chromium-browser` or `google-chrome` on `$PATH`.
    pub fn find() -> anyhow::Result<PathBuf> {
        if let Some(path) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(path));
        }
        const PATHS: [&str; 3] = ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"];
        const NAMES: [&str; 3] = ["chromium", "chromium-browser", "google-chrome"];
        if let Some(path) = PATHS.into_iter().map(PathBuf::from).find(|p| p.is_file()) {
            return Ok(path);
        }
        let dirs: Vec<PathBuf> =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        let mut on_path = NAMES.into_iter().flat_map(|name| dirs.iter().map(move |dir| dir.join(name)));
        on_path.find(|p| p.is_file()).ok_or_else(|| {
            anyhow!(
                "no Chromium found (looked at $CHROMIUM, {PATHS:?}, and for {NAMES:?} on $PATH): \
                 install it with `apt-get install chromium`, or set $CHROMIUM to its path"
            )
        })
    }

    /// Launches a headless Chromium on a fresh profile and connects to its DevTools websocket.
    pub async fn launch() -> anyhow::Result<Browser> {
        let exe = Self::find()?;
        let profile = tempfile::tempdir().context("creating the browser's user-data directory")?;
        let mut user_data_dir = OsString::from("--user-data-dir=");
        user_data_dir.push(profile.path());
        let mut child = ChildGuard(
            Command::new(&exe)
                .args(FLAGS.split_whitespace())
                .arg(user_data_dir)
                .arg("about:blank")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {}", exe.display()))?,
        );
        let stderr = child.0.stderr.take().ok_or_else(|| anyhow!("{} has no stderr pipe", exe.display()))?;
        let (url_tx, url_rx) = oneshot::channel();
        std::thread::spawn(move || read_stderr(stderr, url_tx));
        let ws_url = match tokio::time::timeout(LAUNCH_TIMEOUT, url_rx).await {
            Ok(Ok(Ok(url))) => url,
            Ok(Ok(Err(stderr))) => bail!("{} ended its stderr without a DevTools URL:\n{stderr}", exe.display()),
            Ok(Err(_)) => bail!("the stderr reader of {} stopped", exe.display()),
            Err(_) => bail!("{} printed no DevTools URL within {LAUNCH_TIMEOUT:?}", exe.display()),
        };
        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .with_context(|| format!("connecting to the DevTools websocket {ws_url}"))?;
        let (writer, stream) = ws.split();
        let conn = Arc::new(Connection {
            writer: Mutex::new(writer),
            next_id: AtomicU64::new(1),
            pending: StdMutex::default(),
            sessions: StdMutex::default(),
        });
        let reader = tokio::spawn(read_loop(Arc::clone(&conn), stream));
        Ok(Browser { conn, reader, child, _profile: profile })
    }

    /// Opens a new tab on about:blank, attached as a flattened session with Page, Runtime,
    /// Network and Log enabled.
    pub async fn new_page(&self) -> anyhow::Result<Page> {
        let target = self.conn.call(None, "Target.createTarget", json!({ "url": "about:blank" })).await?;
        let target_id =
            target["targetId"].as_str().ok_or_else(|| anyhow!("Target.createTarget: no targetId in {target}"))?;
        let attached =
            self.conn.call(None, "Target.attachToTarget", json!({ "targetId": target_id, "flatten": true })).await?;
        let session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("Target.attachToTarget: no sessionId in {attached}"))?
            .to_owned();
        let page = Page { conn: Arc::clone(&self.conn), events: self.conn.events(&session), session };
        for domain in ["Page", "Runtime", "Network", "Log"] {
            page.call(&format!("{domain}.enable"), json!({})).await?;
        }
        Ok(page)
    }
}

/// One tab of a [`Browser`], with what its events recorded.
pub struct Page {
    conn: Arc<Connection>,
    session: String,
    events: Arc<StdMutex<SessionEvents>>,
}

impl Page {
    /// Sends any CDP command to this page's session.
    pub async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.conn.call(Some(self.session.as_str()), method, params).await
    }

    /// Navigates to `url` and waits until the new document is complete and on the url's origin.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        let prefix = match ::url::Url::parse(url) {
            Ok(parsed) if parsed.origin().is_tuple() => parsed.origin().ascii_serialization(),
            _ => url.to_owned(),
        };
        // Marks the current document, so that it cannot satisfy the wait below.
        let _ = self.eval("window.__cdpGotoPending = true").await;
        let navigated = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(error) = navigated["errorText"].as_str().filter(|e| !e.is_empty()) {
            bail!("navigating to {url}: {error}");
        }
        // No loaderId: a same-document navigation, whose document keeps the mark.
        let fresh = if navigated.get("loaderId").is_some() { " && !window.__cdpGotoPending" } else { "" };
        let prefix = Value::from(prefix);
        let ready = format!("document.readyState === 'complete' && location.href.startsWith({prefix}){fresh}");
        self.wait_for(&ready, GOTO_TIMEOUT).await.with_context(|| format!("navigating to {url}"))?;
        Ok(())
    }

    /// Evaluates `js` (awaiting a promise) and returns its value; a thrown exception is an Err.
    pub async fn eval(&self, js: &str) -> anyhow::Result<Value> {
        let params = json!({ "expression": js, "awaitPromise": true, "returnByValue": true });
        let evaluated = self.call("Runtime.evaluate", params).await?;
        if let Some(details) = evaluated.get("exceptionDetails") {
            bail!("evaluating `{js}`: {}", exception_text(details));
        }
        Ok(evaluated["result"]["value"].clone())
    }

    /// Polls the expression `js` until it is truthy and returns its value; on timeout, an Err with
    /// the last value or error, the location and the start of the page's text.
    pub async fn wait_for(&self, js: &str, timeout: Duration) -> anyhow::Result<Value> {
        let mut last = "no answer yet".to_owned();
        let polled = tokio::time::timeout(timeout, async {
            loop {
                match self.eval(js).await {
                    Ok(value) if truthy(&value) => return value,
                    Ok(value) => last = format!("last value: {value}"),
                    Err(e) => last = format!("last error: {e:#}"),
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        match polled {
            Ok(value) => Ok(value),
            Err(_) => {
                let state = self.describe().await;
                bail!("`{js}` was not truthy within {timeout:?}; {last}\n{state}")
            }
        }
    }

    /// The location and the first 2000 characters of the page's text, for error messages.
    async fn describe(&self) -> String {
        let js = "({href: location.href, text: document.body ? document.body.innerText.slice(0, 2000) : '(no body)'})";
        match tokio::time::timeout(Duration::from_secs(5), self.eval(js)).await {
            Ok(Ok(state)) => format!(
                "location.href: {}\ndocument.body.innerText (first 2000 chars):\n{}",
                state["href"],
                state["text"].as_str().unwrap_or_default()
            ),
            Ok(Err(e)) => format!("(page state unavailable: {e:#})"),
            Err(_) => "(page state unavailable: no answer)".to_owned(),
        }
    }

    /// Waits until `selector` matches a rendered element.
    async fn wait_visible(&self, selector: &str) -> anyhow::Result<()> {
        self.wait_for(&on_element(selector, VISIBLE_JS, &Value::Null), ELEMENT_TIMEOUT)
            .await
            .with_context(|| format!("{selector:?} never matched a visible element"))?;
        Ok(())
    }

    /// Clicks the centre of the element with real mouse events, once it is visible (scrolled into view).
    pub async fn click(&self, selector: &str) -> anyhow::Result<()> {
        self.wait_visible(selector).await?;
        let center = self.eval(&on_element(selector, CENTER_JS, &Value::Null)).await?;
        let (Some(x), Some(y)) = (center["x"].as_f64(), center["y"].as_f64()) else {
            bail!("click {selector:?}: no coordinates in {center}");
        };
        for (kind, button, buttons, count) in
            [("mouseMoved", "none", 0, 0), ("mousePressed", "left", 1, 1), ("mouseReleased", "left", 0, 1)]
        {
            let params =
                json!({ "type": kind, "x": x, "y": y, "button": button, "buttons": buttons, "clickCount": count });
            self.call("Input.dispatchMouseEvent", params).await?;
        }
        Ok(())
    }

    /// Focuses the element, empties it if it is an input or a textarea, and inserts `text`.
    pub async fn type_text(&self, selector: &str, text: &str) -> anyhow::Result<()> {
        self.wait_visible(selector).await?;
        if self.eval(&on_element(selector, FOCUS_AND_CLEAR_JS, &Value::Null)).await?.as_bool() != Some(true) {
            bail!("type into {selector:?}: no element matches");
        }
        if !text.is_empty() {
            self.call("Input.insertText", json!({ "text": text })).await?;
        }
        Ok(())
    }

    /// Sets a `<select>`'s value and dispatches `input` and `change` (bubbling).
    pub async fn select(&self, selector: &str, value: &str) -> anyhow::Result<()> {
        self.wait_visible(selector).await?;
        let outcome = self.eval(&on_element(selector, SELECT_JS, &Value::from(value))).await?;
        if let Some(problem) = outcome.as_str() {
            bail!("select {value:?} in {selector:?}: {problem}");
        }
        Ok(())
    }

    /// Presses and releases Enter, Tab, Escape, Backspace, ArrowUp or ArrowDown.
    pub async fn press(&self, key: &str) -> anyhow::Result<()> {
        let (vk, text) = match key {
            "Enter" => (13, "\r"),
            "Tab" => (9, ""),
            "Escape" => (27, ""),
            "Backspace" => (8, ""),
            "ArrowUp" => (38, ""),
            "ArrowDown" => (40, ""),
            _ => bail!("press: unsupported key {key:?}"),
        };
        // As Puppeteer does: a key without text goes down as rawKeyDown, one with text as keyDown.
        for kind in [if text.is_empty() { "rawKeyDown" } else { "keyDown" }, "keyUp"] {
            let mut params = json!({ "type": kind, "key": key, "code": key, "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk });
            if kind == "keyDown" {
                params["text"] = text.into();
                params["unmodifiedText"] = text.into();
            }
            self.call("Input.dispatchKeyEvent", params).await?;
        }
        Ok(())
    }

    /// The text content of the first element matching `selector`, or None.
    pub async fn text(&self, selector: &str) -> anyhow::Result<Option<String>> {
        let value = self.eval(&on_element(selector, TEXT_JS, &Value::Null)).await?;
        Ok(value.as_str().map(str::to_owned))
    }

    /// Emulates a viewport of `width` × `height` CSS pixels (scale 1), mobile or not.
    pub async fn set_viewport(&self, width: u32, height: u32, mobile: bool) -> anyhow::Result<()> {
        let params = json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile });
        self.call("Emulation.setDeviceMetricsOverride", params).await?;
        Ok(())
    }

    /// Writes a PNG of the viewport to `path` (creating its directory).
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let shot =
            self.call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": false })).await?;
        let data = shot["data"].as_str().ok_or_else(|| anyhow!("Page.captureScreenshot: no data"))?;
        let png = base64::engine::general_purpose::STANDARD.decode(data).context("decoding the screenshot")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// Every URL the page requested so far, in order (a redirect's target is its own request).
    pub fn requests(&self) -> Vec<String> {
        lock(&self.events).requests.clone()
    }

    /// Console errors and failed assertions, uncaught exceptions, and error-level log entries
    /// (CSP violations, failed loads), as text.
    pub fn errors(&self) -> Vec<String> {
        lock(&self.events).errors.clone()
    }

    /// Every response so far, in order, as (url, status, headers by lowercase name); redirect
    /// responses (from `Network.requestWillBeSent`) included.
    pub fn responses(&self) -> Vec<(String, u16, BTreeMap<String, String>)> {
        lock(&self.events).responses.clone()
    }
}
