//! A vision model through the real server: a tiny Gemma 3 with a SigLIP tower
//! (`Gemma3ForConditionalGeneration`, written by the test, loaded by mistral.rs's multimodal
//! Gemma 3 loader) answers a text-only chat request and a chat request with an image, with
//! LogQuant holding its global layer. Oracles: the default cache's replies on a second server
//! (LogQuant with nothing evicted must give the same greedy text), the prompt token counts (an
//! image adds its soft tokens), and the layer census.

mod common;
#[path = "support/server.rs"]
mod server_process;
mod tiny;

use base64::Engine as _;
use serde_json::{json, Value};
use server_process::Server;
use tiny::{Arch, GEMMA3_IMAGE_SIZE, GEMMA3_IMAGE_TOKENS};

/// A PNG data URL of a 32 x 32 gradient.
fn png_data_url() -> String {
    let side = GEMMA3_IMAGE_SIZE as u32;
    let image = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 8) as u8, ((x + y) * 4) as u8])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, image::ImageFormat::Png)
        .expect("encode PNG");
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes.into_inner())
    )
}

/// A greedy chat reply and its prompt token count.
async fn chat(server: &Server, content: Value) -> (String, u64) {
    let (status, body) = server
        .post(
            "/v1/chat/completions",
            json!({"model": "default", "max_tokens": 8, "temperature": 0,
                   "messages": [{"role": "user", "content": content}]})
            .to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vision_model_answers_text_and_image_requests_with_logquant() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Arch::Gemma3Vision.write_safetensors(&tmp.path().join("tiny-gemma3-vision"));
    let dir = dir.to_str().unwrap();
    let text = json!("w10 w11 w12 w13 w14 w15");
    let with_image = json!([
        {"type": "image_url", "image_url": {"url": png_data_url()}},
        {"type": "text", "text": "w10 w11 w12 w13 w14 w15"},
    ]);

    let default = Server::start(&["-m", dir, "--kv-cache", "default"]);
    let (text_reply, text_tokens) = chat(&default, text.clone()).await;
    let (image_reply, image_tokens) = chat(&default, with_image.clone()).await;
    drop(default);
    assert!(
        image_tokens >= text_tokens + GEMMA3_IMAGE_TOKENS as u64,
        "the image's soft tokens reach the prompt: {text_tokens} text, {image_tokens} with image"
    );

    // Nothing evicted (3W = 300 tokens): LogQuant must answer as the default cache does.
    let logquant = Server::start(&["-m", dir, "--kv-group-size", "16", "--kv-window", "100"]);
    let layers = logquant.get_json("/v1/kv-cache").await["layers"].clone();
    assert_eq!(layers["backend"], 1, "{layers}");
    assert_eq!(layers["sliding_window"], 1, "{layers}");
    assert_eq!(
        chat(&logquant, text.clone()).await,
        (text_reply, text_tokens)
    );
    assert_eq!(
        chat(&logquant, with_image.clone()).await,
        (image_reply, image_tokens)
    );
    drop(logquant);

    // Most tokens quantized (W = 2): still answers the image request.
    let quantized = Server::start(&["-m", dir, "--kv-group-size", "16", "--kv-window", "2"]);
    let (reply, tokens) = chat(&quantized, with_image).await;
    assert_eq!(tokens, image_tokens);
    assert!(!reply.is_empty());
}
