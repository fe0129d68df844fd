//! The OpenAI-compatible `/v1/*` routes, in Ollama's rendition.

use bytes::Bytes;
use hyper::StatusCode;
use hyper::header::{CACHE_CONTROL, CONNECTION, HeaderValue};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::catalog::owned_by;
use super::clock;
use super::fields::{Fields, kind};
use super::generate::{Frames, Plan, spawn_stream};
use super::native::{FAILURE_MESSAGE, embed_inputs, embedding};
use super::respond::{self, Fail, Resp, SSE, SSE_DONE, Surface};
use super::server::{Ctx, require_model};
use super::tokens;

const FINGERPRINT: &str = "fp_ollama";

fn parse(ctx: &Ctx<'_>) -> Result<Fields, Fail> {
    Fields::parse(ctx.body).map_err(|e| Fail::from_body(e, Surface::OpenAi))
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl Usage {
    fn of(plan: &Plan) -> Usage {
        let completion = plan.chunks as u64;
        Usage {
            prompt_tokens: plan.prompt_tokens,
            completion_tokens: completion,
            total_tokens: plan.prompt_tokens + completion,
        }
    }

    fn zero() -> Usage {
        Usage {
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
        }
    }
}

fn include_usage(f: &Fields) -> Result<bool, Fail> {
    Ok(match f.object("stream_options")? {
        Some(o) => o.bool("include_usage")?.unwrap_or(false),
        None => false,
    })
}

/// Parses a JSON array into its raw elements.
fn array<'a>(raw: &'a RawValue, field: &str) -> Result<Vec<&'a RawValue>, Fail> {
    serde_json::from_str::<Vec<&RawValue>>(raw.get()).map_err(|_| {
        Fail::bad(format!(
            "json: cannot unmarshal {} into Go struct field .{field} of type array",
            kind(raw)
        ))
    })
}

/// Text bytes of a `/v1/chat` message `content`: a string, or an array of
/// parts (Go `map[string]any`, so exact keys) whose `text` parts count.
fn chat_content_bytes(content: Option<&RawValue>) -> Result<usize, Fail> {
    let Some(raw) = content else {
        return Ok(0);
    };
    if let Ok(s) = serde_json::from_str::<String>(raw.get()) {
        return Ok(s.len());
    }
    let mut bytes = 0;
    for part in array(raw, "content")? {
        let Some(part) = Fields::from_raw(part, "content")? else {
            return Err(Fail::bad("invalid message format"));
        };
        let is_text = part
            .get_exact("type")
            .and_then(|t| serde_json::from_str::<String>(t.get()).ok())
            .is_some_and(|t| t == "text");
        if is_text {
            match part
                .get_exact("text")
                .and_then(|t| serde_json::from_str::<String>(t.get()).ok())
            {
                Some(text) => bytes += text.len(),
                None => return Err(Fail::bad("invalid message format")),
            }
        }
    }
    Ok(bytes)
}

/// A validated `/v1` generation.
struct Inference {
    echo: String,
    stream: bool,
    include_usage: bool,
    plan: Plan,
    id: u64,
    created: i64,
}

fn check_model(ctx: &Ctx<'_>, echo: &str, what: &str) -> Result<(), Fail> {
    let model = require_model(ctx.st, echo)?;
    if model.embedding_only {
        return Err(Fail::bad(format!("{echo:?} does not support {what}")));
    }
    ctx.st.mark_loaded(&model.name);
    Ok(())
}

fn inference(
    ctx: &Ctx<'_>,
    echo: String,
    stream: bool,
    usage: bool,
    bytes: usize,
    cap: Option<i64>,
) -> Inference {
    Inference {
        echo,
        stream,
        include_usage: usage,
        plan: ctx.knobs.plan(tokens::prompt_tokens(bytes), cap),
        id: ctx.st.next_id(),
        created: clock::unix_now(),
    }
}

fn chat_request(ctx: &Ctx<'_>) -> Result<Inference, Fail> {
    let f = parse(ctx)?;
    let echo = f.string_or_empty("model")?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let usage = include_usage(&f)?;
    let cap = f.ptr_int("max_tokens")?;
    let mut count = 0;
    let mut bytes = 0;
    if let Some(raw) = f.last_raw("messages") {
        for msg in array(raw, "messages")? {
            count += 1;
            if let Some(msg) = Fields::from_raw(msg, "messages")? {
                bytes += chat_content_bytes(msg.last_raw("content"))?;
            }
        }
    }
    if count == 0 {
        return Err(Fail::bad("[] is too short - 'messages'"));
    }
    check_model(ctx, &echo, "chat")?;
    Ok(inference(ctx, echo, stream, usage, bytes, cap))
}

fn completion_request(ctx: &Ctx<'_>) -> Result<Inference, Fail> {
    let f = parse(ctx)?;
    let echo = f.string_or_empty("model")?;
    let prompt = f.string_or_empty("prompt")?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let usage = include_usage(&f)?;
    let cap = f.ptr_int("max_tokens")?;
    check_model(ctx, &echo, "generate")?;
    Ok(inference(ctx, echo, stream, usage, prompt.len(), cap))
}

/// Text bytes of Responses content: a string or an array of content parts
/// (Go structs, so keys match case-insensitively).
fn responses_content_bytes(content: Option<&RawValue>) -> Result<usize, Fail> {
    let Some(raw) = content else {
        return Ok(0);
    };
    if let Ok(s) = serde_json::from_str::<String>(raw.get()) {
        return Ok(s.len());
    }
    let mut bytes = 0;
    for part in array(raw, "content")? {
        if let Some(part) = Fields::from_raw(part, "content")? {
            bytes += part.string_or_empty("text")?.len();
        }
    }
    Ok(bytes)
}

fn responses_input_bytes(input: Option<&RawValue>) -> Result<usize, Fail> {
    let Some(raw) = input else {
        return Ok(0);
    };
    if let Ok(s) = serde_json::from_str::<String>(raw.get()) {
        return Ok(s.len());
    }
    let mut bytes = 0;
    for item in array(raw, "input")? {
        let Some(item) = Fields::from_raw(item, "input")? else {
            continue;
        };
        bytes += responses_content_bytes(item.last_raw("content"))?;
        bytes += responses_content_bytes(item.last_raw("output"))?;
    }
    Ok(bytes)
}

struct ResponsesRequest {
    inf: Inference,
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
}

fn responses_request(ctx: &Ctx<'_>) -> Result<ResponsesRequest, Fail> {
    let f = parse(ctx)?;
    let echo = f.string_or_empty("model")?;
    let stream = f.ptr_bool("stream")?.unwrap_or(false);
    let cap = f.ptr_int("max_output_tokens")?;
    let instructions = f.string_or_empty("instructions")?;
    let bytes = instructions.len() + responses_input_bytes(f.last_raw("input"))?;
    check_model(ctx, &echo, "chat")?;
    Ok(ResponsesRequest {
        inf: inference(ctx, echo, stream, false, bytes, cap),
        instructions: (!instructions.is_empty()).then_some(instructions),
        max_output_tokens: cap,
    })
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

struct ChatFrames {
    inf: Inference,
    id: String,
}

impl ChatFrames {
    fn chunk(&self, choices: Vec<ChunkChoice<'_>>, usage: Option<Usage>) -> Bytes {
        respond::sse_data(&ChatChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: clock::unix_now(),
            model: &self.inf.echo,
            system_fingerprint: FINGERPRINT,
            choices,
            usage,
        })
    }

    fn content_chunk(&self, text: &str) -> Bytes {
        self.chunk(
            vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(text),
                },
                finish_reason: None,
            }],
            None,
        )
    }
}

impl Frames for ChatFrames {
    fn content(&mut self, _index: usize, text: &str) -> Vec<Bytes> {
        vec![self.content_chunk(text)]
    }

    fn finish(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        // Clients expect the assistant role to have been announced once.
        if self.inf.plan.chunks == 0 {
            out.push(self.content_chunk(""));
        }
        out.push(self.chunk(
            vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: None,
                    content: None,
                },
                finish_reason: Some(self.inf.plan.finish.as_str()),
            }],
            None,
        ));
        if self.inf.include_usage {
            out.push(self.chunk(Vec::new(), Some(Usage::of(&self.inf.plan))));
        }
        out.push(Bytes::from_static(SSE_DONE));
        out
    }
}

#[derive(Serialize)]
struct CompleteChoice<'a> {
    text: &'a str,
    index: u32,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct CompletionChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    choices: Vec<CompleteChoice<'a>>,
    model: &'a str,
    system_fingerprint: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

struct CompletionFrames {
    inf: Inference,
    id: String,
}

impl CompletionFrames {
    fn chunk(&self, choices: Vec<CompleteChoice<'_>>, usage: Option<Usage>) -> Bytes {
        respond::sse_data(&CompletionChunk {
            id: &self.id,
            object: "text_completion",
            created: clock::unix_now(),
            choices,
            model: &self.inf.echo,
            system_fingerprint: FINGERPRINT,
            usage,
        })
    }

    /// With `include_usage`, Ollama puts a zeroed usage on every chunk.
    fn zero_usage(&self) -> Option<Usage> {
        self.inf.include_usage.then(Usage::zero)
    }
}

impl Frames for CompletionFrames {
    fn content(&mut self, _index: usize, text: &str) -> Vec<Bytes> {
        vec![self.chunk(
            vec![CompleteChoice {
                text,
                index: 0,
                finish_reason: None,
            }],
            self.zero_usage(),
        )]
    }

    fn finish(&mut self) -> Vec<Bytes> {
        let mut out = vec![self.chunk(
            vec![CompleteChoice {
                text: "",
                index: 0,
                finish_reason: Some(self.inf.plan.finish.as_str()),
            }],
            self.zero_usage(),
        )];
        if self.inf.include_usage {
            out.push(self.chunk(Vec::new(), Some(Usage::of(&self.inf.plan))));
        }
        out.push(Bytes::from_static(SSE_DONE));
        out
    }
}

/// Runs a validated generation: SSE stream, or one JSON body after the
/// simulated generation time.
async fn run<F: Frames>(
    inf_plan: Plan,
    stream: bool,
    frames: F,
    non_stream: impl FnOnce(&str) -> Resp,
) -> Result<Resp, std::io::Error> {
    if stream {
        let body = spawn_stream(inf_plan, frames);
        return Ok(respond::with_type(StatusCode::OK, SSE, body));
    }
    tokio::time::sleep(inf_plan.total_delay()).await;
    if inf_plan.failure_point().is_some() {
        if inf_plan.abort {
            return Err(std::io::Error::other("simulated upstream abort"));
        }
        return Ok(Surface::OpenAi.error(StatusCode::INTERNAL_SERVER_ERROR, FAILURE_MESSAGE));
    }
    Ok(non_stream(&inf_plan.full_text()))
}

pub async fn chat_completions(ctx: &Ctx<'_>) -> Result<Resp, std::io::Error> {
    let inf = match chat_request(ctx) {
        Ok(inf) => inf,
        Err(fail) => return Ok(fail.into_resp(Surface::OpenAi)),
    };
    let id = format!("chatcmpl-{}", inf.id % 999);
    let plan = inf.plan.clone();
    let stream = inf.stream;
    let (echo, created) = (inf.echo.clone(), inf.created);
    let finish = plan.finish.as_str();
    let usage = Usage::of(&plan);
    let frames = ChatFrames {
        inf,
        id: id.clone(),
    };
    run(plan, stream, frames, move |text| {
        #[derive(Serialize)]
        struct Choice<'a> {
            index: u32,
            message: Delta<'a>,
            finish_reason: &'static str,
        }
        #[derive(Serialize)]
        struct ChatCompletion<'a> {
            id: &'a str,
            object: &'static str,
            created: i64,
            model: &'a str,
            system_fingerprint: &'static str,
            choices: Vec<Choice<'a>>,
            usage: Usage,
        }
        respond::json(
            StatusCode::OK,
            &ChatCompletion {
                id: &id,
                object: "chat.completion",
                created,
                model: &echo,
                system_fingerprint: FINGERPRINT,
                choices: vec![Choice {
                    index: 0,
                    message: Delta {
                        role: Some("assistant"),
                        content: Some(text),
                    },
                    finish_reason: finish,
                }],
                usage,
            },
        )
    })
    .await
}

pub async fn completions(ctx: &Ctx<'_>) -> Result<Resp, std::io::Error> {
    let inf = match completion_request(ctx) {
        Ok(inf) => inf,
        Err(fail) => return Ok(fail.into_resp(Surface::OpenAi)),
    };
    let id = format!("cmpl-{}", inf.id % 999);
    let plan = inf.plan.clone();
    let stream = inf.stream;
    let (echo, created) = (inf.echo.clone(), inf.created);
    let finish = plan.finish.as_str();
    let usage = Usage::of(&plan);
    let frames = CompletionFrames {
        inf,
        id: id.clone(),
    };
    run(plan, stream, frames, move |text| {
        #[derive(Serialize)]
        struct Completion<'a> {
            id: &'a str,
            object: &'static str,
            created: i64,
            model: &'a str,
            system_fingerprint: &'static str,
            choices: Vec<CompleteChoice<'a>>,
            usage: Usage,
        }
        respond::json(
            StatusCode::OK,
            &Completion {
                id: &id,
                object: "text_completion",
                created,
                model: &echo,
                system_fingerprint: FINGERPRINT,
                choices: vec![CompleteChoice {
                    text,
                    index: 0,
                    finish_reason: Some(finish),
                }],
                usage,
            },
        )
    })
    .await
}

fn responses_usage(plan: &Plan) -> Value {
    let output = plan.chunks as u64;
    json!({
        "input_tokens": plan.prompt_tokens,
        "output_tokens": output,
        "total_tokens": plan.prompt_tokens + output,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    })
}

fn output_message(item_id: &str, text: &str, status: &str) -> Value {
    json!({
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    })
}

/// The full response object carried by lifecycle events. Built as a JSON
/// map, so keys come out sorted — the same order Go uses for its maps.
fn response_object(
    req: &ResponsesMeta,
    status: &str,
    output: Value,
    usage: Value,
    completed_at: Option<i64>,
) -> Value {
    json!({
        "id": req.response_id,
        "object": "response",
        "created_at": clock::unix_now(),
        "completed_at": completed_at,
        "status": status,
        "incomplete_details": null,
        "model": req.echo,
        "previous_response_id": null,
        "instructions": req.instructions,
        "output": output,
        "error": null,
        "tools": [],
        "tool_choice": "auto",
        "truncation": "disabled",
        "parallel_tool_calls": true,
        "text": {"format": {"type": "text"}},
        "top_p": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_logprobs": 0,
        "temperature": 1,
        "reasoning": null,
        "usage": usage,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": null,
        "store": false,
        "background": false,
        "service_tier": "default",
        "metadata": {},
        "safety_identifier": null,
        "prompt_cache_key": null,
    })
}

struct ResponsesMeta {
    response_id: String,
    item_id: String,
    echo: String,
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
}

struct ResponsesFrames {
    meta: ResponsesMeta,
    plan: Plan,
    seq: u64,
    text: String,
}

impl ResponsesFrames {
    fn event(&mut self, event: &str, mut data: Value) -> Bytes {
        if let Some(obj) = data.as_object_mut() {
            obj.insert("type".into(), json!(event));
            obj.insert("sequence_number".into(), json!(self.seq));
        }
        self.seq += 1;
        respond::sse_event(event, &data)
    }
}

impl Frames for ResponsesFrames {
    fn start(&mut self) -> Vec<Bytes> {
        let created = response_object(&self.meta, "in_progress", json!([]), Value::Null, None);
        vec![
            self.event("response.created", json!({ "response": created })),
            self.event("response.in_progress", json!({ "response": created })),
        ]
    }

    fn content(&mut self, index: usize, text: &str) -> Vec<Bytes> {
        let mut out = Vec::new();
        let item_id = self.meta.item_id.clone();
        if index == 1 {
            out.push(self.event(
                "response.output_item.added",
                json!({
                    "output_index": 0,
                    "item": {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []},
                }),
            ));
            out.push(self.event(
                "response.content_part.added",
                json!({
                    "item_id": item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                }),
            ));
        }
        self.text.push_str(text);
        out.push(self.event(
            "response.output_text.delta",
            json!({
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            }),
        ));
        out
    }

    fn finish(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        let item_id = self.meta.item_id.clone();
        let text = self.text.clone();
        let mut output = json!([]);
        if self.plan.chunks > 0 {
            out.push(self.event(
                "response.output_text.done",
                json!({
                    "item_id": item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                }),
            ));
            out.push(self.event(
                "response.content_part.done",
                json!({
                    "item_id": item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []},
                }),
            ));
            let item = output_message(&item_id, &text, "completed");
            out.push(self.event(
                "response.output_item.done",
                json!({ "output_index": 0, "item": item }),
            ));
            output = json!([item]);
        }
        let response = response_object(
            &self.meta,
            "completed",
            output,
            responses_usage(&self.plan),
            Some(clock::unix_now()),
        );
        out.push(self.event("response.completed", json!({ "response": response })));
        out
    }

    fn fail(&mut self) -> Vec<Bytes> {
        let mut response = response_object(&self.meta, "failed", json!([]), Value::Null, None);
        if let Some(obj) = response.as_object_mut() {
            obj.insert(
                "error".into(),
                json!({"code": "server_error", "message": FAILURE_MESSAGE}),
            );
        }
        vec![self.event("response.failed", json!({ "response": response }))]
    }
}

pub async fn responses(ctx: &Ctx<'_>) -> Result<Resp, std::io::Error> {
    let req = match responses_request(ctx) {
        Ok(r) => r,
        Err(fail) => return Ok(fail.into_resp(Surface::OpenAi)),
    };
    let meta = ResponsesMeta {
        response_id: format!("resp_{}", req.inf.id),
        item_id: format!("msg_{}", req.inf.id),
        echo: req.inf.echo.clone(),
        instructions: req.instructions,
        max_output_tokens: req.max_output_tokens,
    };
    let plan = req.inf.plan.clone();
    if req.inf.stream {
        let frames = ResponsesFrames {
            meta,
            plan: plan.clone(),
            seq: 0,
            text: String::new(),
        };
        let body = spawn_stream(plan, frames);
        let mut resp = respond::with_type(StatusCode::OK, SSE, body);
        resp.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        return Ok(resp);
    }
    let created = req.inf.created;
    run(plan.clone(), false, NoFrames, move |text| {
        let output = json!([output_message(&meta.item_id, text, "completed")]);
        let mut body = response_object(
            &meta,
            "completed",
            output,
            responses_usage(&plan),
            Some(clock::unix_now()),
        );
        if let Some(obj) = body.as_object_mut() {
            obj.insert("created_at".into(), json!(created));
        }
        respond::json(StatusCode::OK, &body)
    })
    .await
}

/// Placeholder for the non-streaming path of [`run`].
struct NoFrames;

impl Frames for NoFrames {
    fn content(&mut self, _index: usize, _text: &str) -> Vec<Bytes> {
        Vec::new()
    }
    fn finish(&mut self) -> Vec<Bytes> {
        Vec::new()
    }
}

pub fn embeddings(ctx: &Ctx<'_>) -> Resp {
    let r: Result<Resp, Fail> = (|| {
        let f = parse(ctx)?;
        let echo = f.string_or_empty("model")?;
        let Some(input) = f.last_raw("input") else {
            return Err(Fail::bad("invalid input"));
        };
        let inputs = embed_inputs(Some(input)).map_err(|_| Fail::bad("invalid input"))?;
        if inputs.is_empty() {
            return Err(Fail::bad("invalid input"));
        }
        let model = require_model(ctx.st, &echo)?;
        ctx.st.mark_loaded(&model.name);
        let prompt = tokens::prompt_tokens(inputs.iter().map(String::len).sum());
        #[derive(Serialize)]
        struct Embedding {
            object: &'static str,
            embedding: Vec<f32>,
            index: usize,
        }
        #[derive(Serialize)]
        struct EmbeddingUsage {
            prompt_tokens: u64,
            total_tokens: u64,
        }
        #[derive(Serialize)]
        struct EmbeddingList {
            object: &'static str,
            data: Vec<Embedding>,
            model: String,
            usage: EmbeddingUsage,
        }
        Ok(respond::json(
            StatusCode::OK,
            &EmbeddingList {
                object: "list",
                data: inputs
                    .iter()
                    .enumerate()
                    .map(|(index, s)| Embedding {
                        object: "embedding",
                        embedding: embedding(s),
                        index,
                    })
                    .collect(),
                model: echo,
                usage: EmbeddingUsage {
                    prompt_tokens: prompt,
                    total_tokens: prompt,
                },
            },
        ))
    })();
    r.unwrap_or_else(|f| f.into_resp(Surface::OpenAi))
}

#[derive(Serialize)]
struct ModelEntry {
    id: String,
    object: &'static str,
    created: i64,
    owned_by: String,
}

pub fn models(ctx: &Ctx<'_>) -> Resp {
    let data: Vec<ModelEntry> = ctx
        .st
        .catalog
        .models
        .iter()
        .map(|m| ModelEntry {
            id: m.name.clone(),
            object: "model",
            created: m.modified_unix,
            owned_by: owned_by(&m.name),
        })
        .collect();
    #[derive(Serialize)]
    struct List {
        object: &'static str,
        data: Vec<ModelEntry>,
    }
    respond::json(
        StatusCode::OK,
        &List {
            object: "list",
            data,
        },
    )
}

pub fn model(ctx: &Ctx<'_>, id: &str) -> Resp {
    match ctx.st.catalog.find(id) {
        Some(m) => respond::json(
            StatusCode::OK,
            &ModelEntry {
                id: id.to_string(),
                object: "model",
                created: m.modified_unix,
                owned_by: owned_by(id),
            },
        ),
        None => Surface::OpenAi.error(StatusCode::NOT_FOUND, &format!("model '{id}' not found")),
    }
}
