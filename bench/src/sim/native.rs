//! Ollama's native `/api/*` routes.

use bytes::Bytes;
use hyper::StatusCode;
use serde::Serialize;
use serde_json::json;

use super::body::SimBody;
use super::catalog::{Details, Model, REMOTE_HOST};
use super::clock;
use super::fields::Fields;
use super::generate::{Frames, Plan, spawn_stream};
use super::respond::{self, Fail, NDJSON, Resp, Surface};
use super::server::{Ctx, require_model};
use super::tokens::{self, Timings};

pub const FAILURE_MESSAGE: &str = "simulated upstream failure";

fn parse(ctx: &Ctx<'_>) -> Result<Fields, Fail> {
    Fields::parse(ctx.body).map_err(|e| Fail::from_body(e, Surface::Native))
}

fn done(r: Result<Resp, Fail>) -> Resp {
    r.unwrap_or_else(|f| f.into_resp(Surface::Native))
}

/// Validation either rejects, answers directly (load/unload), or yields a
/// generation to run.
enum Validated {
    Answer(Resp),
    Run(Inference),
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Final-chunk metrics; zero values are omitted like Go's `omitempty`.
#[derive(Debug, Default, Clone, Serialize)]
struct Metrics {
    #[serde(skip_serializing_if = "is_zero")]
    total_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    load_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    prompt_eval_count: u64,
    #[serde(skip_serializing_if = "is_zero")]
    prompt_eval_duration: u64,
    #[serde(skip_serializing_if = "is_zero")]
    eval_count: u64,
    #[serde(skip_serializing_if = "is_zero")]
    eval_duration: u64,
}

impl Metrics {
    fn final_counts(prompt_tokens: u64, eval_count: u64) -> Metrics {
        let t = Timings::new(prompt_tokens, eval_count);
        Metrics {
            total_duration: t.total,
            load_duration: t.load,
            prompt_eval_count: prompt_tokens,
            prompt_eval_duration: t.prompt_eval,
            eval_count,
            eval_duration: t.eval,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Debug, Serialize)]
struct ChatChunk<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_host: Option<&'static str>,
    created_at: String,
    message: Message<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    done_reason: Option<&'a str>,
    done: bool,
    #[serde(flatten)]
    metrics: Metrics,
}

#[derive(Debug, Serialize)]
struct GenerateChunk<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_host: Option<&'static str>,
    created_at: String,
    response: &'a str,
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    done_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<Vec<u64>>,
    #[serde(flatten)]
    metrics: Metrics,
}

/// What both native inference routes need after validation.
struct Inference {
    echo: String,
    remote_model: Option<String>,
    stream: bool,
    plan: Plan,
    raw: bool,
}

impl Inference {
    fn remote(&self) -> (Option<&str>, Option<&'static str>) {
        match &self.remote_model {
            Some(r) => (Some(r.as_str()), Some(REMOTE_HOST)),
            None => (None, None),
        }
    }
}

/// `options.num_predict`; options is a Go `map[string]any`, so the key is
/// matched exactly and numbers are truncated to integers.
fn num_predict(f: &Fields) -> Result<Option<i64>, Fail> {
    let Some(opts) = f.object("options")? else {
        return Ok(None);
    };
    match opts.get_exact("num_predict") {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => serde_json::from_str::<f64>(raw.get())
            .map(|v| Some(v as i64))
            .map_err(|_| Fail::bad("option \"num_predict\" must be of type integer")),
    }
}

/// `keep_alive` of zero (number, or a duration string such as "0" / "0s")
/// turns an empty request into an unload.
fn keep_alive_zero(f: &Fields) -> bool {
    let Some(raw) = f.last_raw("keep_alive") else {
        return false;
    };
    let text = match serde_json::from_str::<String>(raw.get()) {
        Ok(s) => s,
        Err(_) => raw.get().to_string(),
    };
    let digits = text
        .trim()
        .trim_end_matches(|c: char| c.is_ascii_alphabetic());
    !digits.is_empty() && digits.parse::<f64>().is_ok_and(|v| v == 0.0)
}

fn model_not_supported(echo: &str, what: &str) -> Fail {
    Fail::bad(format!("{echo:?} does not support {what}"))
}

/// Response to an empty prompt: Ollama only loads (or unloads) the model.
fn load_response(ctx: &Ctx<'_>, f: &Fields, model: &Model, echo: &str, chat: bool) -> Resp {
    let reason = if keep_alive_zero(f) {
        ctx.st.unload(&model.name);
        "unload"
    } else {
        ctx.st.mark_loaded(&model.name);
        "load"
    };
    if chat {
        respond::json(
            StatusCode::OK,
            &ChatChunk {
                model: echo,
                remote_model: None,
                remote_host: None,
                created_at: clock::now_rfc3339(),
                message: Message {
                    role: "assistant",
                    content: "",
                },
                done_reason: Some(reason),
                done: true,
                metrics: Metrics::default(),
            },
        )
    } else {
        respond::json(
            StatusCode::OK,
            &GenerateChunk {
                model: echo,
                remote_model: None,
                remote_host: None,
                created_at: clock::now_rfc3339(),
                response: "",
                done: true,
                done_reason: Some(reason),
                context: None,
                metrics: Metrics::default(),
            },
        )
    }
}

/// Concatenated `content` of native chat messages (each a Go struct, so
/// keys match case-insensitively and `content` must be a string).
fn chat_prompt_bytes(
    messages: Option<&serde_json::value::RawValue>,
) -> Result<(usize, usize), Fail> {
    let Some(raw) = messages else {
        return Ok((0, 0));
    };
    let items: Vec<Box<serde_json::value::RawValue>> = serde_json::from_str(raw.get())
        .map_err(|_| Fail::bad(format!(
            "json: cannot unmarshal {} into Go struct field ChatRequest.messages of type []api.Message",
            super::fields::kind(raw)
        )))?;
    let mut bytes = 0;
    for item in &items {
        if let Some(msg) = Fields::from_raw(item, "messages")? {
            bytes += msg.string_or_empty("content")?.len();
        }
    }
    Ok((items.len(), bytes))
}

fn plan(ctx: &Ctx<'_>, prompt_bytes: usize, cap: Option<i64>) -> Plan {
    ctx.knobs.plan(tokens::prompt_tokens(prompt_bytes), cap)
}

fn chat_request(ctx: &Ctx<'_>) -> Result<Validated, Fail> {
    let f = parse(ctx)?;
    let echo = f.string_or_empty("model")?;
    let model = require_model(ctx.st, &echo)?;
    let stream = f.ptr_bool("stream")?.unwrap_or(true);
    let cap = num_predict(&f)?;
    let (count, content_bytes) = chat_prompt_bytes(f.last_raw("messages"))?;
    let system = f.string_or_empty("system")?;
    if model.embedding_only {
        return Err(model_not_supported(&echo, "chat"));
    }
    if count == 0 {
        return Ok(Validated::Answer(load_response(
            ctx, &f, model, &echo, true,
        )));
    }
    ctx.st.mark_loaded(&model.name);
    Ok(Validated::Run(Inference {
        plan: plan(ctx, content_bytes + system.len(), cap),
        echo,
        remote_model: model.remote_model.clone(),
        stream,
        raw: false,
    }))
}

pub async fn chat(ctx: &Ctx<'_>) -> Result<Resp, std::io::Error> {
    match chat_request(ctx) {
        Err(fail) => Ok(fail.into_resp(Surface::Native)),
        Ok(Validated::Answer(resp)) => Ok(resp),
        Ok(Validated::Run(inf)) => respond_inference(inf, true).await,
    }
}

fn generate_request(ctx: &Ctx<'_>) -> Result<Validated, Fail> {
    let f = parse(ctx)?;
    let echo = f.string_or_empty("model")?;
    let model = require_model(ctx.st, &echo)?;
    let stream = f.ptr_bool("stream")?.unwrap_or(true);
    let cap = num_predict(&f)?;
    let prompt = f.string_or_empty("prompt")?;
    let system = f.string_or_empty("system")?;
    let raw = f.bool("raw")?.unwrap_or(false);
    if model.embedding_only {
        return Err(model_not_supported(&echo, "generate"));
    }
    if prompt.is_empty() && f.last_raw("images").is_none() {
        return Ok(Validated::Answer(load_response(
            ctx, &f, model, &echo, false,
        )));
    }
    ctx.st.mark_loaded(&model.name);
    Ok(Validated::Run(Inference {
        plan: plan(ctx, system.len() + prompt.len(), cap),
        echo,
        remote_model: model.remote_model.clone(),
        stream,
        raw,
    }))
}

pub async fn generate(ctx: &Ctx<'_>) -> Result<Resp, std::io::Error> {
    match generate_request(ctx) {
        Err(fail) => Ok(fail.into_resp(Surface::Native)),
        Ok(Validated::Answer(resp)) => Ok(resp),
        Ok(Validated::Run(inf)) => respond_inference(inf, false).await,
    }
}

struct NativeFrames {
    inf: Inference,
    chat: bool,
}

impl NativeFrames {
    fn chunk(&self, text: &str, final_chunk: bool) -> Bytes {
        let (remote_model, remote_host) = self.inf.remote();
        let plan = &self.inf.plan;
        let metrics = if final_chunk {
            Metrics::final_counts(plan.prompt_tokens, plan.chunks as u64)
        } else {
            Metrics::default()
        };
        let done_reason = final_chunk.then(|| plan.finish.as_str());
        if self.chat {
            respond::ndjson_line(&ChatChunk {
                model: &self.inf.echo,
                remote_model,
                remote_host,
                created_at: clock::now_rfc3339(),
                message: Message {
                    role: "assistant",
                    content: text,
                },
                done_reason,
                done: final_chunk,
                metrics,
            })
        } else {
            let context = (final_chunk && !self.inf.raw).then(|| {
                let len = (plan.prompt_tokens + plan.chunks as u64).min(32);
                (0..len).map(|i| 100 + i).collect()
            });
            respond::ndjson_line(&GenerateChunk {
                model: &self.inf.echo,
                remote_model,
                remote_host,
                created_at: clock::now_rfc3339(),
                response: text,
                done: final_chunk,
                done_reason,
                context,
                metrics,
            })
        }
    }
}

impl Frames for NativeFrames {
    fn content(&mut self, _index: usize, text: &str) -> Vec<Bytes> {
        vec![self.chunk(text, false)]
    }

    fn finish(&mut self) -> Vec<Bytes> {
        vec![self.chunk("", true)]
    }

    fn fail(&mut self) -> Vec<Bytes> {
        vec![respond::ndjson_line(&json!({ "error": FAILURE_MESSAGE }))]
    }
}

async fn respond_inference(inf: Inference, chat: bool) -> Result<Resp, std::io::Error> {
    if inf.stream {
        let plan = inf.plan.clone();
        let body = spawn_stream(plan, NativeFrames { inf, chat });
        return Ok(respond::with_type(StatusCode::OK, NDJSON, body));
    }
    tokio::time::sleep(inf.plan.total_delay()).await;
    if inf.plan.failure_point().is_some() {
        if inf.plan.abort {
            return Err(std::io::Error::other("simulated upstream abort"));
        }
        return Ok(Surface::Native.error(StatusCode::INTERNAL_SERVER_ERROR, FAILURE_MESSAGE));
    }
    let text = inf.plan.full_text();
    let frames = NativeFrames { inf, chat };
    let mut line = frames.chunk(&text, true).to_vec();
    line.pop();
    Ok(respond::with_type(
        StatusCode::OK,
        respond::JSON,
        SimBody::full(line),
    ))
}

/// Inputs of `/api/embed` and `/v1/embeddings`: a string or an array of strings.
pub fn embed_inputs(raw: Option<&serde_json::value::RawValue>) -> Result<Vec<String>, Fail> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    if let Ok(s) = serde_json::from_str::<String>(raw.get()) {
        return Ok(if s.is_empty() { Vec::new() } else { vec![s] });
    }
    serde_json::from_str::<Vec<String>>(raw.get()).map_err(|_| Fail::bad("invalid input type"))
}

/// Deterministic unit vector of dimension 8 for a text.
pub fn embedding(text: &str) -> Vec<f32> {
    let raw: Vec<f64> = (0..8u64)
        .map(|i| {
            let h = super::catalog::hash(i + 100, text.as_bytes());
            (h % 20_001) as f64 / 10_000.0 - 1.0
        })
        .collect();
    let norm = raw.iter().map(|v| v * v).sum::<f64>().sqrt();
    let norm = if norm == 0.0 { 1.0 } else { norm };
    raw.iter().map(|v| (v / norm) as f32).collect()
}

pub fn embed(ctx: &Ctx<'_>) -> Resp {
    let r: Result<Resp, Fail> = (|| {
        let f = parse(ctx)?;
        let echo = f.string_or_empty("model")?;
        let model = require_model(ctx.st, &echo)?;
        let inputs = embed_inputs(f.last_raw("input"))?;
        ctx.st.mark_loaded(&model.name);
        if inputs.is_empty() {
            return Ok(respond::json(
                StatusCode::OK,
                &json!({"model": echo, "embeddings": []}),
            ));
        }
        let bytes: usize = inputs.iter().map(String::len).sum();
        let prompt = tokens::prompt_tokens(bytes);
        let t = Timings::new(prompt, 0);
        #[derive(Serialize)]
        struct EmbedResponse {
            model: String,
            embeddings: Vec<Vec<f32>>,
            total_duration: u64,
            load_duration: u64,
            prompt_eval_count: u64,
        }
        Ok(respond::json(
            StatusCode::OK,
            &EmbedResponse {
                model: echo,
                embeddings: inputs.iter().map(|s| embedding(s)).collect(),
                total_duration: t.total,
                load_duration: t.load,
                prompt_eval_count: prompt,
            },
        ))
    })();
    done(r)
}

pub fn embeddings(ctx: &Ctx<'_>) -> Resp {
    let r: Result<Resp, Fail> = (|| {
        let f = parse(ctx)?;
        let echo = f.string_or_empty("model")?;
        if echo.trim().is_empty() {
            return Err(Fail::bad("model is required"));
        }
        let Some(model) = ctx.st.catalog.find(&echo) else {
            return Err(Fail::not_found(format!(
                "model {echo:?} not found, try pulling it first"
            )));
        };
        let prompt = f.string_or_empty("prompt")?;
        ctx.st.mark_loaded(&model.name);
        // The legacy endpoint uses float64 values.
        let values: Vec<f64> = if prompt.is_empty() {
            Vec::new()
        } else {
            embedding(&prompt).into_iter().map(f64::from).collect()
        };
        Ok(respond::json(
            StatusCode::OK,
            &json!({ "embedding": values }),
        ))
    })();
    done(r)
}

/// Wrapper that keeps entry fields in struct order (a `json!` map would sort them).
#[derive(Serialize)]
struct ModelList<T> {
    models: Vec<T>,
}

#[derive(Serialize)]
struct TagEntry<'a> {
    name: &'a str,
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_host: Option<&'static str>,
    modified_at: String,
    size: u64,
    digest: &'a str,
    details: &'a Details,
}

pub fn tags(ctx: &Ctx<'_>) -> Resp {
    let models: Vec<TagEntry<'_>> = ctx
        .st
        .catalog
        .models
        .iter()
        .map(|m| TagEntry {
            name: &m.name,
            model: &m.name,
            remote_model: m.remote_model.as_deref(),
            remote_host: m.remote_model.as_ref().map(|_| REMOTE_HOST),
            modified_at: m.modified_at(),
            size: m.size,
            digest: &m.digest,
            details: &m.details,
        })
        .collect();
    respond::json(StatusCode::OK, &ModelList { models })
}

#[derive(Serialize)]
struct PsEntry<'a> {
    name: &'a str,
    model: &'a str,
    size: u64,
    digest: &'a str,
    details: &'a Details,
    expires_at: String,
    size_vram: u64,
    context_length: u64,
}

pub fn ps(ctx: &Ctx<'_>) -> Resp {
    let loaded = ctx.st.loaded();
    let expires = clock::rfc3339(clock::unix_now() + 300, 0);
    let models: Vec<PsEntry<'_>> = ctx
        .st
        .catalog
        .models
        .iter()
        .filter(|m| ctx.knobs.ps_all || loaded.contains(&m.name))
        .map(|m| PsEntry {
            name: &m.name,
            model: &m.name,
            size: m.size,
            digest: &m.digest,
            details: &m.details,
            expires_at: expires.clone(),
            size_vram: m.size,
            context_length: m.context_length.min(4096),
        })
        .collect();
    respond::json(StatusCode::OK, &ModelList { models })
}

pub fn show(ctx: &Ctx<'_>) -> Resp {
    let r: Result<Resp, Fail> = (|| {
        let f = parse(ctx)?;
        let mut echo = f.string_or_empty("model")?;
        if echo.is_empty() {
            echo = f.string_or_empty("name")?;
        }
        let model = require_model(ctx.st, &echo)?;
        let arch = model.details.family.replace('-', "_");
        let template = if model.embedding_only {
            "{{ .Prompt }}"
        } else {
            "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}{{ end }}<|assistant|>"
        };
        let parameters = "stop                           \"<|eot|>\"";
        let modelfile = format!(
            "# Modelfile generated by \"ollama show\"\n# To build a new Modelfile based on this, replace FROM with:\n# FROM {name}\n\nFROM /usr/share/ollama/.ollama/models/blobs/sha256-{digest}\nTEMPLATE \"\"\"{template}\"\"\"\nPARAMETER {parameters}\n",
            name = model.name,
            digest = model.digest,
        );
        let mut model_info = serde_json::Map::new();
        model_info.insert("general.architecture".into(), json!(arch));
        model_info.insert(
            "general.parameter_count".into(),
            json!(model.size.saturating_mul(2)),
        );
        model_info.insert(
            format!("{arch}.context_length"),
            json!(model.context_length),
        );
        model_info.insert(format!("{arch}.embedding_length"), json!(2048));
        #[derive(Serialize)]
        struct Show<'a> {
            license: &'static str,
            modelfile: String,
            parameters: &'static str,
            template: &'static str,
            details: &'a Details,
            #[serde(skip_serializing_if = "Option::is_none")]
            remote_model: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            remote_host: Option<&'static str>,
            model_info: serde_json::Map<String, serde_json::Value>,
            capabilities: Vec<&'static str>,
            modified_at: String,
        }
        Ok(respond::json(
            StatusCode::OK,
            &Show {
                license: "Simulated license text",
                modelfile,
                parameters,
                template,
                details: &model.details,
                remote_model: model.remote_model.as_deref(),
                remote_host: model.remote_model.as_ref().map(|_| REMOTE_HOST),
                model_info,
                capabilities: model.capabilities(),
                modified_at: model.modified_at(),
            },
        ))
    })();
    done(r)
}

/// Model named by `model`, falling back to the legacy `name`.
fn model_or_name(f: &Fields) -> Result<String, Fail> {
    let m = f.string_or_empty("model")?;
    if !m.is_empty() {
        return Ok(m);
    }
    Ok(f.string_or_empty("name")?)
}

/// One progress line of pull/push/create, in Go's field order.
#[derive(Serialize)]
struct Progress {
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completed: Option<u64>,
}

impl Progress {
    fn status(status: impl Into<String>) -> Progress {
        Progress {
            status: status.into(),
            digest: None,
            total: None,
            completed: None,
        }
    }
}

/// The progress-stream endpoints (pull/push/create): NDJSON status lines
/// ending in `success`, or just the success object when `stream:false`.
fn progress(ctx: &Ctx<'_>, statuses: Vec<Progress>) -> Resp {
    let r: Result<Resp, Fail> = (|| {
        let f = parse(ctx)?;
        let name = model_or_name(&f)?;
        if name.trim().is_empty() {
            return Err(Fail::bad("model is required"));
        }
        let success = Progress::status("success");
        if f.ptr_bool("stream")? == Some(false) {
            return Ok(respond::json(StatusCode::OK, &success));
        }
        let mut lines: Vec<Bytes> = statuses.iter().map(respond::ndjson_line).collect();
        lines.push(respond::ndjson_line(&success));
        let (body, writer) = SimBody::channel(ctx.knobs.delay);
        tokio::spawn(async move {
            for (i, line) in lines.into_iter().enumerate() {
                if (i > 0 && !writer.pause().await) || !writer.send(line).await {
                    return;
                }
            }
        });
        Ok(respond::with_type(StatusCode::OK, NDJSON, body))
    })();
    done(r)
}

pub fn pull(ctx: &Ctx<'_>) -> Resp {
    let digest = super::catalog::digest("pulled");
    let layer = |completed| Progress {
        status: format!("pulling {}", &digest[..12]),
        digest: Some(format!("sha256:{digest}")),
        total: Some(1024),
        completed: Some(completed),
    };
    progress(
        ctx,
        vec![
            Progress::status("pulling manifest"),
            layer(512),
            layer(1024),
            Progress::status("verifying sha256 digest"),
            Progress::status("writing manifest"),
        ],
    )
}

pub fn push(ctx: &Ctx<'_>) -> Resp {
    progress(
        ctx,
        vec![
            Progress::status("retrieving manifest"),
            Progress::status("pushing manifest"),
        ],
    )
}

pub fn create(ctx: &Ctx<'_>) -> Resp {
    progress(
        ctx,
        vec![
            Progress::status("gathering model components"),
            Progress::status("writing manifest"),
        ],
    )
}

pub fn copy(ctx: &Ctx<'_>) -> Resp {
    let r: Result<Resp, Fail> = (|| {
        let f = parse(ctx)?;
        let source = f.string_or_empty("source")?;
        let destination = f.string_or_empty("destination")?;
        if source.is_empty() || destination.is_empty() {
            return Err(Fail::bad("source and destination are required"));
        }
        require_model(ctx.st, &source)?;
        Ok(respond::empty(StatusCode::OK))
    })();
    done(r)
}

pub fn delete(ctx: &Ctx<'_>) -> Resp {
    let r: Result<Resp, Fail> = (|| {
        let f = parse(ctx)?;
        let name = model_or_name(&f)?;
        require_model(ctx.st, &name)?;
        Ok(respond::empty(StatusCode::OK))
    })();
    done(r)
}

pub fn blobs(ctx: &Ctx<'_>) -> Resp {
    if ctx.method == hyper::Method::HEAD {
        respond::empty(StatusCode::OK)
    } else {
        respond::empty(StatusCode::CREATED)
    }
}

pub fn me() -> Resp {
    respond::json(
        StatusCode::OK,
        &json!({"id": "sim-user", "email": "sim@example.invalid", "name": "sim", "plan": "free"}),
    )
}

pub fn web() -> Resp {
    respond::json(StatusCode::OK, &json!({"results": []}))
}

pub fn status() -> Resp {
    respond::json(
        StatusCode::OK,
        &json!({"cloud": {"disabled": false, "source": "default"}}),
    )
}
