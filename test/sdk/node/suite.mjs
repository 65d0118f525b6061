// The official OpenAI Node SDK against a shoal router, as a user migrating
// from vLLM would call it. Run by test/e2e/sdk_test.go:
//   SHOAL_BASE_URL=http://ROUTER/v1 SHOAL_KEY=... SHOAL_SLOW_KEY=... node suite.mjs
// SHOAL_MODEL is a generative deployment started with
// --enable-auto-tool-choice --tool-call-parser hermes; SHOAL_EMBED_MODEL a
// pooling one. SHOAL_SLOW_KEY is limited to 1 request/s (burst 1). Each check
// prints "ok NAME" or "FAIL NAME: why"; the exit status is the failures.
import OpenAI from 'openai';
import assert from 'node:assert/strict';

const baseURL = process.env.SHOAL_BASE_URL;
const model = process.env.SHOAL_MODEL || 'demo';
const embedModel = process.env.SHOAL_EMBED_MODEL || 'bge';
const client = new OpenAI({ baseURL, apiKey: process.env.SHOAL_KEY, maxRetries: 0, timeout: 60_000 });
const user = [{ role: 'user', content: 'Say hello from a simulated H200.' }];
const weather = [{
  type: 'function',
  function: {
    name: 'get_weather', description: 'Weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' }, unit: { enum: ['c', 'f'] } }, required: ['city'] },
  },
}];

const checks = [];
const check = (name, fn) => checks.push({ name, fn });

check('models.list has the engine card', async () => {
  const list = [];
  for await (const m of client.models.list()) list.push(m);
  const m = list.find((x) => x.id === model);
  assert.ok(m, `no ${model} in ${JSON.stringify(list.map((x) => x.id))}`);
  assert.equal(m.object, 'model');
  assert.equal(m.owned_by, 'vllm');
  assert.ok(m.max_model_len > 0, 'max_model_len from the engine');
  assert.ok(m.created > 0);
  assert.ok(list.find((x) => x.id === embedModel));
});

check('models.retrieve', async () => {
  const m = await client.models.retrieve(model);
  assert.equal(m.id, model);
  await assert.rejects(client.models.retrieve('no-such-model'), (e) => e instanceof OpenAI.NotFoundError && e.status === 404);
});

check('chat.completions', async () => {
  const r = await client.chat.completions.create({ model, messages: user, max_tokens: 8 });
  assert.equal(r.object, 'chat.completion');
  assert.ok(r.id.startsWith('chatcmpl-'));
  assert.equal(r.choices.length, 1);
  assert.equal(r.choices[0].message.role, 'assistant');
  assert.ok(r.choices[0].message.content.length > 0);
  assert.ok(['stop', 'length'].includes(r.choices[0].finish_reason));
  assert.ok(r.usage.prompt_tokens > 0 && r.usage.completion_tokens > 0);
});

check('chat.completions stream with usage', async () => {
  const s = await client.chat.completions.create({ model, messages: user, max_tokens: 8, stream: true, stream_options: { include_usage: true } });
  let text = '', finish = null, usage = null;
  for await (const c of s) {
    if (c.usage) usage = c.usage;
    for (const ch of c.choices) {
      text += ch.delta?.content ?? '';
      finish = ch.finish_reason ?? finish;
    }
  }
  assert.ok(text.length > 0);
  assert.ok(finish);
  assert.ok(usage && usage.completion_tokens > 0);
});

check('chat stream helper (runner)', async () => {
  const runner = client.chat.completions.stream({ model, messages: user, max_tokens: 6 });
  const done = await runner.finalChatCompletion();
  assert.ok(done.choices[0].message.content.length > 0);
});

check('completions, streamed and not, echo and prompt lists', async () => {
  const r = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 5, echo: true });
  assert.equal(r.object, 'text_completion');
  assert.ok(r.choices[0].text.startsWith('Once upon a time'));
  const many = await client.completions.create({ model, prompt: ['a', 'b'], max_tokens: 2 });
  assert.equal(many.choices.length, 2);
  const ids = await client.completions.create({ model, prompt: [1, 2, 3, 4], max_tokens: 2 });
  assert.equal(ids.usage.prompt_tokens, 4);
  const s = await client.completions.create({ model, prompt: 'x', max_tokens: 4, stream: true });
  let text = '';
  for await (const c of s) text += c.choices[0]?.text ?? '';
  assert.ok(text.length > 0);
});

check('n choices', async () => {
  const r = await client.chat.completions.create({ model, messages: user, max_tokens: 4, n: 3 });
  assert.deepEqual(r.choices.map((c) => c.index), [0, 1, 2]);
});

check('logprobs, chat and completions', async () => {
  const r = await client.chat.completions.create({ model, messages: user, max_tokens: 3, logprobs: true, top_logprobs: 2 });
  const lp = r.choices[0].logprobs.content;
  assert.ok(lp.length > 0);
  assert.ok(lp[0].logprob <= 0);
  assert.equal(lp[0].top_logprobs.length, 2);
  const c = await client.completions.create({ model, prompt: 'x', max_tokens: 3, logprobs: 2 });
  assert.equal(c.choices[0].logprobs.tokens.length, c.choices[0].logprobs.token_logprobs.length);
});

check('temperature samples anew; a seed repeats', async () => {
  const a = await client.completions.create({ model, prompt: 'same', max_tokens: 6, seed: 7 });
  const b = await client.completions.create({ model, prompt: 'same', max_tokens: 6, seed: 7 });
  assert.equal(a.choices[0].text, b.choices[0].text);
});

check('tools: a tool call, whole', async () => {
  const r = await client.chat.completions.create({ model, messages: [{ role: 'user', content: 'Weather in Paris?' }], tools: weather });
  const ch = r.choices[0];
  assert.equal(ch.finish_reason, 'tool_calls');
  const call = ch.message.tool_calls[0];
  assert.equal(call.type, 'function');
  assert.equal(call.function.name, 'get_weather');
  assert.equal(typeof JSON.parse(call.function.arguments).city, 'string');
});

check('tools: a tool call, streamed and accumulated by the SDK', async () => {
  const runner = client.chat.completions.stream({ model, messages: [{ role: 'user', content: 'Weather in Paris?' }], tools: weather });
  const done = await runner.finalChatCompletion();
  const call = done.choices[0].message.tool_calls[0];
  assert.equal(call.function.name, 'get_weather');
  assert.equal(typeof JSON.parse(call.function.arguments).city, 'string');
});

check('structured output (json_schema)', async () => {
  const schema = { type: 'object', properties: { name: { type: 'string' }, age: { type: 'integer' } }, required: ['name', 'age'] };
  const r = await client.chat.completions.create({ model, messages: user, response_format: { type: 'json_schema', json_schema: { name: 'person', schema } } });
  const v = JSON.parse(r.choices[0].message.content);
  assert.equal(typeof v.name, 'string');
  assert.ok(Number.isInteger(v.age));
});

check('responses, whole', async () => {
  const r = await client.responses.create({ model, input: 'Say hello.', max_output_tokens: 8, store: false });
  assert.equal(r.object, 'response');
  assert.equal(r.status, 'completed');
  assert.ok(r.output_text.length > 0);
});

check('responses, streamed events', async () => {
  const s = await client.responses.create({ model, input: [{ role: 'user', content: 'hi' }], max_output_tokens: 6, stream: true, store: false });
  const types = [];
  let text = '';
  for await (const e of s) {
    types.push(e.type);
    if (e.type === 'response.output_text.delta') text += e.delta;
  }
  assert.equal(types[0], 'response.created');
  assert.equal(types.at(-1), 'response.completed');
  assert.ok(text.length > 0);
});

check('embeddings on a pooling deployment', async () => {
  const r = await client.embeddings.create({ model: embedModel, input: ['a', 'b'] });
  assert.equal(r.data.length, 2);
  assert.ok(r.data[0].embedding.length > 0);
});

check('errors and their types', async () => {
  await assert.rejects(client.chat.completions.create({ model: 'no-such-model', messages: user }),
    (e) => e instanceof OpenAI.NotFoundError && e.status === 404);
  await assert.rejects(client.chat.completions.create({ model, messages: user, max_tokens: 0 }),
    (e) => e instanceof OpenAI.BadRequestError && /max_tokens/.test(e.message));
  await assert.rejects(client.embeddings.create({ model, input: 'x' }),
    (e) => e instanceof OpenAI.BadRequestError && /Embeddings API/.test(e.message));
  await assert.rejects(client.chat.completions.create({ model: embedModel, messages: user }),
    (e) => e instanceof OpenAI.BadRequestError);
  const bad = new OpenAI({ baseURL, apiKey: 'sk-shoal-wrong', maxRetries: 0 });
  await assert.rejects(bad.chat.completions.create({ model, messages: user }),
    (e) => e instanceof OpenAI.AuthenticationError && e.status === 401);
});

check('retries follow Retry-After', async () => {
  const slow = new OpenAI({ baseURL, apiKey: process.env.SHOAL_SLOW_KEY, maxRetries: 2 });
  await slow.completions.create({ model, prompt: 'x', max_tokens: 1 });
  const t0 = Date.now();
  // The key's one token is spent: the router answers 429 with Retry-After,
  // the SDK waits as told and succeeds.
  const r = await slow.completions.create({ model, prompt: 'x', max_tokens: 1 });
  assert.ok(r.choices.length === 1);
  assert.ok(Date.now() - t0 >= 500, `retried after ${Date.now() - t0} ms`);
  const none = new OpenAI({ baseURL, apiKey: process.env.SHOAL_SLOW_KEY, maxRetries: 0 });
  await assert.rejects(none.completions.create({ model, prompt: 'x', max_tokens: 1 }),
    (e) => e instanceof OpenAI.RateLimitError && e.status === 429 && Number(e.headers.get('retry-after')) >= 1);
});

check('abort stops the stream, and the engine request with it', async () => {
  const ac = new AbortController();
  const s = await client.chat.completions.create({ model, messages: user, max_tokens: 2000, stream: true, ignore_eos: true }, { signal: ac.signal });
  let chunks = 0;
  try {
    for await (const c of s) {
      chunks++;
      if (chunks === 2) ac.abort();
    }
  } catch (e) {
    assert.ok(e instanceof OpenAI.APIUserAbortError || e.name === 'AbortError', `${e}`);
  }
  assert.ok(ac.signal.aborted);
  assert.ok(chunks >= 2 && chunks < 100, `${chunks} chunks after the abort`);
  // The router closes the engine's connection (vLLM aborts the request):
  // nothing stays in flight.
  const metrics = baseURL.replace(/\/v1\/?$/, '') + '/metrics';
  let inflight = -1;
  for (let i = 0; i < 50 && inflight !== 0; i++) {
    const text = await (await fetch(metrics)).text();
    const m = text.match(new RegExp(`shoal_router_inflight_requests\\{model="${model}"\\} (\\d+)`));
    inflight = m ? Number(m[1]) : 0;
    if (inflight !== 0) await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(inflight, 0);
});

let failed = 0;
for (const { name, fn } of checks) {
  try {
    await fn();
    console.log(`ok ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e?.stack ?? e}`);
  }
}
console.log(`${checks.length - failed}/${checks.length} passed`);
process.exit(failed);
