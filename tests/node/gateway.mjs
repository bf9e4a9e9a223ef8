// The official openai Node.js SDK against a running `genfan serve` (tests/test_serve_clients.py
// starts the gateway and reads what this prints: one JSON object).
import OpenAI from "openai";

const baseURL = process.env.GATEWAY_URL;
const client = new OpenAI({ baseURL, apiKey: process.env.GATEWAY_KEY, maxRetries: 0 });
const out = {};

const chat = await client.chat.completions.create({
  model: "fanout",
  messages: [{ role: "user", content: "hello from node" }],
});
out.json = { content: chat.choices[0].message.content, kind: chat.genfan.kind,
             candidates: chat.genfan.candidates.length, usage: chat.usage };

const stream = await client.chat.completions.create({
  model: "a",
  messages: [{ role: "user", content: "stream me" }],
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let usage = null;
for await (const chunk of stream) {
  text += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
out.stream = { text, usage };

const tools = await client.chat.completions.create({
  model: "a",
  messages: [{ role: "user", content: "weather?" }],
  tools: [{ type: "function", function: { name: "get_weather",
            parameters: { type: "object", properties: { city: { type: "string" } } } } }],
  tool_choice: { type: "function", function: { name: "get_weather" } },
});
out.tools = { finish: tools.choices[0].finish_reason,
              name: tools.choices[0].message.tool_calls[0].function.name };

const emb = await client.embeddings.create({ model: "a", input: ["x", "y"] });
out.embeddings = { count: emb.data.length, dims: emb.data[0].embedding.length };

async function failure(fn) {
  try {
    await fn();
    return { status: 0 };
  } catch (err) {
    return { status: err.status, code: err.code ?? null, type: err.type ?? null,
             retryAfter: err.headers?.get?.("retry-after") ?? null,
             name: err.constructor.name };
  }
}
out.notFound = await failure(() => client.chat.completions.create({
  model: "nope", messages: [{ role: "user", content: "x" }] }));
const stranger = new OpenAI({ baseURL, apiKey: "gf-000000000000-notakeynotakeynotakey", maxRetries: 0 });
out.badKey = await failure(() => stranger.models.list());
const limited = new OpenAI({ baseURL, apiKey: process.env.GATEWAY_LIMITED_KEY, maxRetries: 0 });
const first = await failure(() => limited.chat.completions.create({
  model: "a", messages: [{ role: "user", content: "x" }] }));
out.limited = [first, await failure(() => limited.chat.completions.create({
  model: "a", messages: [{ role: "user", content: "x" }] }))];

console.log(JSON.stringify(out));
