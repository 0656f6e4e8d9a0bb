//! Chat templates rendered in child processes with an address-space limit.
//!
//! A checkpoint's chat template is code its author wrote, and minijinja bounds its
//! instructions and its output but not the strings it builds without printing them: a loop
//! that doubles a string in a variable grew the server to 16 GB before the kernel killed it.
//! `qnext serve` therefore renders in workers (`qnext render-worker`, the same executable) whose
//! address space is limited (`RLIMIT_AS`): such a template makes the worker's allocation fail,
//! which ends that worker only; the request gets a 400 that says so, and the next request a
//! fresh worker.
//!
//! Protocol: one JSON object per line each way. Request `{"messages", "tools",
//! "add_generation_prompt", "extra"}`; answer `{"text": …}` or `{"error": …}`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::text::ChatTemplate;

/// Address space a worker may use (its executable and libraries take ≈ 100 MB of it): room for
/// a 64 MiB request body parsed several times over and the largest output.
pub const WORKER_MEMORY: u64 = 2 << 30;

/// How to start a worker: the executable and the arguments that load the server's template.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// Idle workers, each used by one request at a time; as many exist as requests render at once
/// (the server's text-work permits bound that).
pub struct RenderPool {
    command: WorkerCommand,
    idle: Mutex<Vec<Worker>>,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RenderPool {
    /// Starts one worker to check that it runs and loads the template.
    pub fn start(command: WorkerCommand) -> Result<RenderPool> {
        let pool = RenderPool {
            command,
            idle: Mutex::new(Vec::new()),
        };
        let w = pool.spawn()?;
        pool.idle.lock().unwrap_or_else(|e| e.into_inner()).push(w);
        Ok(pool)
    }

    fn spawn(&self) -> Result<Worker> {
        let mut child = Command::new(&self.command.program)
            .args(&self.command.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!(
                    "starting the chat template worker {}",
                    self.command.program.display()
                )
            })?;
        let stdin = child.stdin.take().context("the worker's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("the worker's stdout")?);
        let mut w = Worker {
            child,
            stdin,
            stdout,
        };
        // The worker says it is ready once its template has loaded.
        let mut line = String::new();
        w.stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("the chat template worker did not start: {}", line.trim());
        }
        Ok(w)
    }

    /// Renders as [`ChatTemplate::render`] does, in a worker.
    pub fn render(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
        extra: &Map<String, Value>,
    ) -> Result<String> {
        let mut request = serde_json::to_vec(&json!({
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
            "extra": extra,
        }))?;
        request.push(b'\n');
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut w = match idle {
            Some(w) => w,
            None => self.spawn()?,
        };
        let send = |w: &mut Worker| w.stdin.write_all(&request).and_then(|_| w.stdin.flush());
        if send(&mut w).is_err() {
            // An idle worker that is gone (killed from outside): a fresh one takes the request.
            w = self.spawn()?;
            send(&mut w)?;
        }
        let mut line = String::new();
        let read = w.stdout.read_line(&mut line);
        if !matches!(read, Ok(n) if n > 0) {
            // The worker ended: its allocation failed (or it was killed). Dropping it reaps it.
            let status = w.child.wait().ok();
            bail!(
                "rendering the chat template ended its worker process ({}): a template that \
                 builds more than {} MiB of text in memory is stopped there",
                status.map_or("no status".into(), |s| s.to_string()),
                WORKER_MEMORY >> 20
            );
        }
        let answer: Value = serde_json::from_str(&line)
            .map_err(|e| anyhow!("the chat template worker answered {line:?}: {e}"))?;
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(w);
        match (answer.get("text"), answer.get("error")) {
            (Some(Value::String(t)), _) => Ok(t.clone()),
            (_, Some(Value::String(e))) => Err(anyhow!("{e}")),
            _ => bail!("the chat template worker answered {line:?}"),
        }
    }
}

/// The worker's side (`qnext render-worker`): limits its own address space, says `ready`, then
/// answers requests on stdin until it closes.
pub fn serve_stdio(template: ChatTemplate, memory: u64) -> Result<()> {
    #[cfg(unix)]
    {
        let limit = libc::rlimit {
            rlim_cur: memory as libc::rlim_t,
            rlim_max: memory as libc::rlim_t,
        };
        // SAFETY: setrlimit reads the struct passed by reference and changes only this
        // process's limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
            bail!(
                "render-worker: setrlimit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut line = String::new();
    loop {
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(req) => {
                let none = Map::new();
                let extra = req.get("extra").and_then(Value::as_object).unwrap_or(&none);
                let tools = req.get("tools").filter(|t| !t.is_null());
                let add = req
                    .get("add_generation_prompt")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                let messages = req.get("messages").unwrap_or(&Value::Null);
                match template.render(messages, tools, add, extra) {
                    Ok(text) => json!({ "text": text }),
                    Err(e) => json!({ "error": format!("{e:#}") }),
                }
            }
            Err(e) => json!({ "error": format!("render-worker: bad request line: {e}") }),
        };
        serde_json::to_writer(&mut out, &answer)?;
        out.write_all(b"\n")?;
        out.flush()?;
    }
}
