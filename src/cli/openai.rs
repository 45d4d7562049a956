//! The OpenAI wire contract around mistral.rs's chat and completion handlers: every request is
//! checked (and OpenAI forms that mistral.rs lacks are mapped onto its own) before the engine
//! sees it, and every response leaves in OpenAI's shape: errors as
//! `{"error": {"message", "type", "param", "code"}}` (streamed ones as a JSON event), token
//! strings in `top_logprobs`, `logprobs.content` in chat chunks, and the legacy completions
//! logprobs (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Map, Value};

/// An error in OpenAI's shape.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// A 400 naming the request field at fault.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            code: Some("invalid_value"),
            ..Self::invalid(message)
        }
    }

    pub fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Which handler a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// What the checked request asks for, beyond the body the handler reads.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    /// `seed`: sample from a generator of this seed.
    pub seed: Option<u64>,
    /// `stream_options.include_usage`: a streamed reply ends with a usage chunk.
    pub include_usage: bool,
}

fn number(object: &Map<String, Value>, field: &str) -> Result<Option<f64>, ApiError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(ApiError::field(
            field,
            format!("invalid value {other} for `{field}` (allowed: a number)"),
        )),
    }
}

fn in_range(
    object: &Map<String, Value>,
    field: &str,
    min: f64,
    max: f64,
) -> Result<Option<f64>, ApiError> {
    let value = number(object, field)?;
    if let Some(v) = value {
        if !(min..=max).contains(&v) {
            return Err(ApiError::field(
                field,
                format!("invalid value {v} for `{field}` (allowed: {min} to {max})"),
            ));
        }
    }
    Ok(value)
}

fn integer_in(
    object: &Map<String, Value>,
    field: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, ApiError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_u64().filter(|v| (min..=max).contains(v)) {
            Some(v) => Ok(Some(v)),
            None => Err(ApiError::field(
                field,
                format!(
                    "invalid value {value} for `{field}` (allowed: an integer from {min} to {max})"
                ),
            )),
        },
    }
}

/// Check the sampling parameters of a chat or completion request and map OpenAI forms that
/// mistral.rs does not read onto its own. Out-of-range values are refused with a 400 naming
/// the field.
pub fn check_request(
    endpoint: Endpoint,
    object: &mut Map<String, Value>,
) -> Result<Checked, ApiError> {
    in_range(object, "temperature", 0.0, 2.0)?;
    // top_p 0 keeps only the most likely token: the sampler then decodes greedily.
    in_range(object, "top_p", 0.0, 1.0)?;
    in_range(object, "min_p", 0.0, 1.0)?;
    in_range(object, "presence_penalty", -2.0, 2.0)?;
    in_range(object, "frequency_penalty", -2.0, 2.0)?;
    if let Some(p) = number(object, "repetition_penalty")? {
        if p <= 0.0 {
            return Err(ApiError::field(
                "repetition_penalty",
                format!("invalid value {p} for `repetition_penalty` (allowed: a number > 0)"),
            ));
        }
    }
    integer_in(object, "max_tokens", 1, u32::MAX as u64)?;
    integer_in(object, "max_completion_tokens", 1, u32::MAX as u64)?;
    integer_in(object, "n", 1, 128)?;
    integer_in(object, "top_k", 0, u32::MAX as u64)?;
    let seed = match object.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|i| i as u64))
                .ok_or_else(|| {
                    ApiError::field(
                        "seed",
                        format!("invalid value {v} for `seed` (allowed: an integer)"),
                    )
                })?,
        ),
    };
    match endpoint {
        Endpoint::Chat => {
            let logprobs = match object.get("logprobs") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(ApiError::field(
                        "logprobs",
                        format!("invalid value {other} for `logprobs` (allowed: true, false)"),
                    ))
                }
            };
            let top = integer_in(object, "top_logprobs", 0, 20)?;
            if top.is_some() && !logprobs {
                return Err(ApiError::field(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs: true`",
                ));
            }
            if logprobs && top.is_none() {
                // OpenAI's default: the chosen token's log-probability, no alternatives.
                object.insert("top_logprobs".into(), json!(0));
            }
            check_response_format(object)?;
        }
        Endpoint::Completion => {
            integer_in(object, "logprobs", 0, 5)?;
        }
    }
    let include_usage = match object.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(ApiError::field(
                    "stream_options.include_usage",
                    format!("invalid value {other} for `stream_options.include_usage` (allowed: true, false)"),
                ))
            }
        },
        Some(other) => {
            return Err(ApiError::field(
                "stream_options",
                format!("invalid value {other} for `stream_options` (allowed: an object)"),
            ))
        }
    };
    // mistral.rs 0.8.1 reads `logit_bias` and never applies it: refused rather than ignored.
    match object.get("logit_bias") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) if map.is_empty() => {}
        Some(_) => {
            return Err(ApiError::field(
                "logit_bias",
                "`logit_bias` is not supported by this server",
            ))
        }
    }
    Ok(Checked {
        seed,
        include_usage,
    })
}

/// `response_format`: `text`, `json_schema`, or `json_object` (any JSON object, through
/// mistral.rs's JSON-schema constraint).
fn check_response_format(object: &mut Map<String, Value>) -> Result<(), ApiError> {
    let (kind, shown) = match object.get("response_format") {
        None | Some(Value::Null) => return Ok(()),
        Some(format) => (
            format
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            format.to_string(),
        ),
    };
    if object.get("grammar").is_some_and(|g| !g.is_null()) {
        return Err(ApiError::field(
            "response_format",
            "`response_format` and `grammar` cannot be used together",
        ));
    }
    match kind.as_str() {
        "text" | "json_schema" => Ok(()),
        "json_object" => {
            object.insert(
                "response_format".into(),
                json!({"type": "json_schema",
                       "json_schema": {"name": "json_object", "schema": {"type": "object"}}}),
            );
            Ok(())
        }
        _ => Err(ApiError::field(
            "response_format",
            format!(
                "invalid `response_format` {shown} (allowed types: text, json_object, json_schema)"
            ),
        )),
    }
}

/// The part of an engine message meant for a client: no backtrace.
fn client_message(text: &str) -> String {
    let cut = ["Stack backtrace", "\n   0:", "stack backtrace"]
        .iter()
        .filter_map(|m| text.find(m))
        .min()
        .unwrap_or(text.len());
    let message = text[..cut].trim();
    if message.is_empty() {
        "internal error".to_string()
    } else {
        message.to_string()
    }
}

/// An error message from mistral.rs (or axum's body extractor) in OpenAI's shape.
fn classify(status: StatusCode, text: &str) -> ApiError {
    let full = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| {
            v.get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| v.as_str().map(str::to_string))
        })
        .unwrap_or_else(|| text.to_string());
    let message = client_message(&full);
    if message.len() < full.trim().len() {
        tracing::warn!("engine error (sent to the client without its backtrace): {full}");
    }
    if message.contains("Prompt sequence length is greater than") {
        return ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(message)
        };
    }
    if status.is_server_error() {
        return ApiError {
            status,
            kind: "server_error",
            message,
            param: None,
            code: None,
        };
    }
    // mistral.rs answers an invalid request with 422, axum's JSON extractor with 400/422/415.
    let status = match status {
        StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
        s if s.is_client_error() => s,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError {
        status,
        ..ApiError::invalid(message)
    }
}

/// A streamed error event's JSON.
fn stream_error(text: &str) -> Value {
    let error = classify(StatusCode::INTERNAL_SERVER_ERROR, text);
    error.body()
}

/// A top-logprob entry of mistral.rs (`token` an id, `bytes` the text) in OpenAI's shape.
fn shape_top(entry: &mut Value) {
    let text = entry
        .get("bytes")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            entry
                .get("token")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_default();
    entry["bytes"] = json!(text.as_bytes());
    entry["token"] = json!(text);
}

/// One chat token's logprob entry: token strings in its alternatives.
fn shape_token_entry(entry: &mut Value) {
    if let Some(tops) = entry.get_mut("top_logprobs").and_then(Value::as_array_mut) {
        tops.iter_mut().for_each(shape_top);
    }
}

/// Legacy completions logprobs from per-token entries, offsets counted from `start`.
fn legacy_logprobs(entries: &[Value], start: usize) -> (Value, usize) {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    let mut offset = start;
    for entry in entries {
        let token = entry
            .get("token")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        text_offset.push(offset);
        offset += token.chars().count();
        token_logprobs.push(entry.get("logprob").cloned().unwrap_or(Value::Null));
        let mut tops = Map::new();
        for top in entry
            .get("top_logprobs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let text = top
                .get("bytes")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            tops.insert(text, top.get("logprob").cloned().unwrap_or(Value::Null));
        }
        top_logprobs.push(Value::Object(tops));
        tokens.push(token);
    }
    (
        json!({
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }),
        offset,
    )
}

/// Reshapes a JSON body (whole or one streamed chunk) of one endpoint.
#[derive(Debug)]
struct Shaper {
    endpoint: Endpoint,
    /// The served model's name, put in `model` (mistral.rs puts its pipeline's name there,
    /// which for a local model is a path).
    model: Option<String>,
    /// Characters streamed so far per choice (completions `text_offset`).
    offsets: HashMap<u64, usize>,
    /// Whether a streamed reply ends with a usage chunk (`stream_options.include_usage`).
    include_usage: bool,
}

impl Shaper {
    fn shape(&mut self, body: &mut Value) {
        if let (Some(name), Some(model)) = (&self.model, body.get_mut("model")) {
            *model = Value::String(name.clone());
        }
        let Some(choices) = body.get_mut("choices").and_then(Value::as_array_mut) else {
            return;
        };
        for choice in choices {
            trim_cut_character(choice);
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let text_len = choice
                .get("text")
                .and_then(Value::as_str)
                .map(|t| t.chars().count());
            let Some(logprobs) = choice.get_mut("logprobs") else {
                continue;
            };
            if logprobs.is_null() {
                continue;
            }
            // A chat chunk or a completion chunk carries one token's entry, a whole response
            // `{"content": [...]}`.
            let entries: Vec<Value> = match logprobs.get("content") {
                Some(Value::Array(list)) => list.clone(),
                Some(_) => Vec::new(),
                None => vec![logprobs.clone()],
            };
            match self.endpoint {
                Endpoint::Chat => {
                    let mut entries = entries;
                    entries.iter_mut().for_each(shape_token_entry);
                    *logprobs = json!({ "content": entries, "refusal": null });
                }
                Endpoint::Completion => {
                    let streamed = logprobs.get("content").is_none();
                    let start = if streamed {
                        *self.offsets.get(&index).unwrap_or(&0)
                    } else {
                        // With `echo` the text starts with the prompt: offsets follow it.
                        let generated: usize = entries
                            .iter()
                            .filter_map(|e| e.get("token").and_then(Value::as_str))
                            .map(|t| t.chars().count())
                            .sum();
                        text_len.unwrap_or(0).saturating_sub(generated)
                    };
                    let (legacy, end) = legacy_logprobs(&entries, start);
                    if streamed {
                        self.offsets.insert(index, end);
                    }
                    *logprobs = legacy;
                }
            }
        }
    }

    /// One server-sent event, reshaped: a chunk's logprobs, or an error as a JSON event.
    fn shape_event(&mut self, raw: &str) -> String {
        let mut data = Vec::new();
        let mut other = String::new();
        for line in raw.lines() {
            if let Some(d) = line.strip_prefix("data:") {
                data.push(d.strip_prefix(' ').unwrap_or(d));
            } else if !line.is_empty() {
                other.push_str(line);
                other.push('\n');
            }
        }
        if data.is_empty() {
            return raw.to_string();
        }
        let data = data.join("\n");
        if data == "[DONE]" {
            return raw.to_string();
        }
        let shaped = match serde_json::from_str::<Value>(&data) {
            Ok(mut v) if v.is_object() && v.get("error").is_none() => {
                self.shape(&mut v);
                v
            }
            Ok(v) if v.get("error").is_some() => v,
            _ => stream_error(&data),
        };
        // mistral.rs puts the usage on the last content chunk, asked for or not. OpenAI sends
        // it only with `include_usage`, as a chunk of its own with no choices.
        let usage = match shaped.get("usage") {
            Some(u) if !u.is_null() => Some(u.clone()),
            _ => None,
        };
        let Some(usage) = usage else {
            return format!("{other}data: {shaped}\n\n");
        };
        let mut content = shaped.clone();
        content["usage"] = Value::Null;
        let mut out = String::new();
        let has_choices = content
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| !c.is_empty());
        if has_choices {
            out.push_str(&format!("{other}data: {content}\n\n"));
        }
        if self.include_usage {
            let mut usage_chunk = content;
            usage_chunk["choices"] = json!([]);
            usage_chunk["usage"] = usage;
            out.push_str(&format!("data: {usage_chunk}\n\n"));
        }
        out
    }
}

/// A reply cut by the length limit inside a multi-byte character ends in U+FFFD, the
/// detokenizer's stand-in for the incomplete bytes: those bytes are held back, as a stream holds
/// them back until the character is complete.
fn trim_cut_character(choice: &mut Value) {
    if choice.get("finish_reason").and_then(Value::as_str) != Some("length") {
        return;
    }
    for pointer in ["/message/content", "/delta/content", "/text"] {
        let Some(text) = choice.pointer_mut(pointer) else {
            continue;
        };
        if let Some(t) = text.as_str().filter(|t| t.ends_with('\u{FFFD}')) {
            *text = Value::String(t.trim_end_matches('\u{FFFD}').to_string());
        }
    }
}

/// Bring a handler's response into OpenAI's shape, naming the model `model` when given.
pub async fn shape_response(
    endpoint: Endpoint,
    model: Option<String>,
    checked: Checked,
    response: Response,
) -> Response {
    let status = response.status();
    let (mut parts, body) = response.into_parts();
    let is_stream = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !status.is_success() {
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        return classify(status, &String::from_utf8_lossy(&bytes)).into_response();
    }
    let mut shaper = Shaper {
        endpoint,
        model,
        offsets: HashMap::new(),
        include_usage: checked.include_usage,
    };
    if is_stream {
        parts.headers.remove(header::CONTENT_LENGTH);
        let stream = body.into_data_stream();
        let events = futures::stream::unfold(
            (stream, shaper, String::new(), false),
            |(mut stream, mut shaper, mut buffer, done)| async move {
                if done {
                    return None;
                }
                loop {
                    if let Some(end) = buffer.find("\n\n") {
                        let event: String = buffer.drain(..end + 2).collect();
                        let out = shaper.shape_event(&event);
                        return Some((
                            Ok::<Bytes, axum::Error>(Bytes::from(out)),
                            (stream, shaper, buffer, false),
                        ));
                    }
                    match stream.next().await {
                        Some(Ok(chunk)) => buffer.push_str(&String::from_utf8_lossy(&chunk)),
                        Some(Err(e)) => return Some((Err(e), (stream, shaper, buffer, true))),
                        None => {
                            let rest = std::mem::take(&mut buffer);
                            return (!rest.is_empty()).then(|| {
                                (Ok(Bytes::from(rest)), (stream, shaper, String::new(), true))
                            });
                        }
                    }
                }
            },
        );
        return Response::from_parts(parts, Body::from_stream(events));
    }
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            return classify(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()).into_response()
        }
    };
    let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    shaper.shape(&mut value);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(token: &str, lp: f32) -> Value {
        json!({"token": token, "logprob": lp, "bytes": token.as_bytes(),
               "top_logprobs": [{"token": 17, "logprob": lp, "bytes": token},
                                {"token": 18, "logprob": -3.0, "bytes": " x"}]})
    }

    #[test]
    fn completions_get_the_legacy_shape_with_offsets_after_an_echoed_prompt() {
        let mut shaper = Shaper {
            endpoint: Endpoint::Completion,
            model: Some("My-Model".into()),
            offsets: HashMap::new(),
            include_usage: false,
        };
        let mut body = json!({"model": "/models/dir", "choices": [{"index": 0,
            "text": "Hi there", "logprobs": {"content": [entry(" there", -0.5)]}}]});
        shaper.shape(&mut body);
        assert_eq!(body["model"], "My-Model");
        let lp = &body["choices"][0]["logprobs"];
        assert_eq!(lp["tokens"], json!([" there"]));
        assert_eq!(lp["token_logprobs"], json!([-0.5]));
        assert_eq!(lp["top_logprobs"][0][" x"], json!(-3.0));
        assert_eq!(lp["text_offset"], json!([2]));
    }

    #[test]
    fn streamed_errors_become_json_events_and_chat_chunks_get_content_lists() {
        let mut shaper = Shaper {
            endpoint: Endpoint::Chat,
            model: Some("My-Model".into()),
            offsets: HashMap::new(),
            include_usage: false,
        };
        let event = shaper.shape_event("data: logquant: group size 48\n\n");
        let v: Value = serde_json::from_str(event.trim().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["error"]["message"], "logquant: group size 48");
        let chunk = json!({"model": "/models/dir",
                           "choices": [{"index": 0, "logprobs": entry("a", -0.1)}]});
        let event = shaper.shape_event(&format!("data: {chunk}\n\n"));
        let v: Value = serde_json::from_str(event.trim().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["model"], "My-Model");
        assert_eq!(
            v["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["token"],
            " x"
        );
        assert_eq!(shaper.shape_event(": keep-alive\n\n"), ": keep-alive\n\n");
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        for (body, field) in [
            (json!({"temperature": -1}), "temperature"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"top_logprobs": 2}), "top_logprobs"),
            (json!({"seed": "x"}), "seed"),
            (
                json!({"response_format": {"type": "yaml"}}),
                "response_format",
            ),
        ] {
            let mut object = body.as_object().unwrap().clone();
            let err = check_request(Endpoint::Chat, &mut object).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(field), "{body}");
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn backtraces_stay_in_the_log() {
        let e = classify(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"message":"narrow invalid args\nStack backtrace:\n   0: foo"}"#,
        );
        assert_eq!(e.message, "narrow invalid args");
        assert_eq!(e.kind, "server_error");
    }
}
