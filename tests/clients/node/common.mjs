// Shared helpers for the Node.js client system tests.
//
// Each script prints exactly one JSON document on stdout and diagnostics on
// stderr. The manifest format is shared with the Python and Rust programs:
//   {"client":"node","topic":"...","messages":[{"message_id","body","tag","keys","properties"}]}
import { parseArgs, format } from 'node:util';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import rmq from 'rocketmq-client-nodejs';

export { rmq };
export const LANG = 'node';
const VERBOSE = !!process.env.RMQ_TEST_VERBOSE;

export function log(...args) {
  const ts = new Date().toTimeString().slice(0, 8);
  process.stderr.write(`[${LANG} ${ts}] ${format(...args)}\n`);
}

// The default client logger writes to ~/logs/rocketmq and is closed (then
// reused) during shutdown; use a stderr logger that shows warnings and errors.
export const clientLogger = {
  info: (...a) => { if (VERBOSE) process.stderr.write(`[node-client INFO] ${format(...a)}\n`); },
  debug: (...a) => { if (VERBOSE) process.stderr.write(`[node-client DEBUG] ${format(...a)}\n`); },
  warn: (...a) => process.stderr.write(`[node-client WARN] ${format(...a)}\n`),
  error: (...a) => process.stderr.write(`[node-client ERROR] ${format(...a)}\n`),
};

export function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

export function finish(code) {
  // Let stdout drain, then exit regardless of the client's open handles.
  process.stdout.write('', () => process.exit(code));
  setTimeout(() => process.exit(code), 2000).unref();
}

export function startWatchdog(seconds, what) {
  const t = setTimeout(() => {
    log(`FAIL: ${what}: overall timeout of ${seconds}s exceeded, aborting`);
    emit({ client: LANG, ok: false, errors: [ `timeout after ${seconds}s` ] });
    finish(3);
  }, seconds * 1000);
  t.unref();
  return t;
}

export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not complete within ${ms} ms`)), ms);
  });
  return Promise.race([ promise, timeout ]).finally(() => clearTimeout(timer));
}

export const sleep = ms => new Promise(r => setTimeout(r, ms));

// Parse command-line options; `extra` adds script-specific options.
export function parseOptions(extra = {}, required = []) {
  const { values } = parseArgs({
    options: {
      endpoint: { type: 'string', default: process.env.SLUICE_ENDPOINT },
      topic: { type: 'string', default: process.env.SLUICE_TOPIC },
      group: { type: 'string', default: process.env.SLUICE_GROUP },
      namespace: { type: 'string', default: process.env.SLUICE_NAMESPACE ?? '' },
      'access-key': { type: 'string', default: process.env.SLUICE_ACCESS_KEY ?? '' },
      'secret-key': { type: 'string', default: process.env.SLUICE_SECRET_KEY ?? '' },
      timeout: { type: 'string', default: '120' },
      'request-timeout': { type: 'string', default: '5000' },
      help: { type: 'boolean', default: false },
      ...extra,
    },
    strict: true,
  });
  if (values.help) {
    process.stderr.write(`options: ${Object.keys({ endpoint: 1, topic: 1, group: 1, namespace: 1, 'access-key': 1, 'secret-key': 1, timeout: 1, 'request-timeout': 1, ...extra }).map(k => '--' + k).join(' ')}\n`);
    process.exit(0);
  }
  const missing = required.filter(k => !values[k]);
  if (missing.length) {
    log(`missing required argument(s): ${missing.map(m => '--' + m).join(', ')}`);
    process.exit(2);
  }
  return values;
}

export function clientOptions(opts) {
  return {
    endpoints: opts.endpoint,
    namespace: opts.namespace ?? '',
    ...(opts['access-key']
      ? { sessionCredentials: { accessKey: opts['access-key'], accessSecret: opts['secret-key'] ?? '' } }
      : {}),
    requestTimeout: Number(opts['request-timeout']),
    logger: clientLogger,
  };
}

export function newRunId() {
  return randomBytes(6).toString('hex');
}

export function messageSpec(runId, index, tag) {
  let body = `sluice-test ${LANG} run=${runId} index=${index} unicode=h\u00e9llo-\u2713`;
  if (index % 5 === 4) body += ' ' + '0123456789abcdef'.repeat(512);
  return {
    body,
    tag,
    keys: [ `key-${runId}-${index}`, `order-${index}` ],
    properties: { index: String(index), lang: LANG, run: runId, note: '\u00fcnicode \u2713 value' },
  };
}

export function toMessageOptions(topic, spec) {
  return {
    topic,
    body: Buffer.from(spec.body, 'utf8'),
    tag: spec.tag || undefined,
    keys: spec.keys || [],
    properties: new Map(Object.entries(spec.properties || {})),
  };
}

export function viewToDict(mv) {
  return {
    message_id: mv.messageId,
    body: Buffer.from(mv.body).toString('utf8'),
    tag: mv.tag || null,
    keys: [ ...(mv.keys || []) ].sort(),
    properties: Object.fromEntries(mv.properties || new Map()),
    delivery_attempt: mv.deliveryAttempt,
    corrupted: !!mv.corrupted,
    topic: mv.topic,
  };
}

function sameJson(a, b) {
  const norm = o => JSON.stringify(Object.keys(o || {}).sort().map(k => [ k, o[k] ]));
  return norm(a) === norm(b);
}

export function compareMessage(expected, got) {
  const errs = [];
  const mid = expected.message_id;
  if (got.message_id !== mid) errs.push(`${mid}: message_id ${JSON.stringify(got.message_id)} != ${JSON.stringify(mid)}`);
  if (got.body !== expected.body) {
    errs.push(`${mid}: body differs (got ${JSON.stringify((got.body || '').slice(0, 80))}..., want ${JSON.stringify(expected.body.slice(0, 80))}...)`);
  }
  if ((got.tag || null) !== (expected.tag || null)) errs.push(`${mid}: tag ${got.tag} != ${expected.tag}`);
  const gk = [ ...(got.keys || []) ].sort();
  const ek = [ ...(expected.keys || []) ].sort();
  if (JSON.stringify(gk) !== JSON.stringify(ek)) errs.push(`${mid}: keys ${JSON.stringify(gk)} != ${JSON.stringify(ek)}`);
  if (!sameJson(got.properties, expected.properties)) {
    errs.push(`${mid}: properties ${JSON.stringify(got.properties)} != ${JSON.stringify(expected.properties)}`);
  }
  if (got.corrupted) errs.push(`${mid}: client flagged the message as corrupted (body digest mismatch)`);
  return errs;
}

export function loadManifest(path) {
  const data = JSON.parse(readFileSync(path, 'utf8'));
  if (!Array.isArray(data.messages)) throw new Error(`${path}: not a send manifest (no "messages")`);
  return data;
}

export async function safeShutdown(client, what, ms = 15000) {
  if (!client) return;
  try {
    await withTimeout(client.shutdown(), ms, `${what} shutdown`);
  } catch (e) {
    log(`warning: ${what} shutdown failed: ${e && e.message}`);
  }
}

// Send `count` messages with a started Producer; returns { sent, errors }.
export async function sendMessages(producer, topic, count, tag, runId) {
  const sent = [];
  const errors = [];
  for (let i = 0; i < count; i++) {
    const spec = messageSpec(runId, i, tag);
    const receipt = await producer.send(toMessageOptions(topic, spec));
    if (!receipt || !receipt.messageId) errors.push(`send #${i}: empty message id in receipt`);
    spec.message_id = receipt.messageId;
    sent.push(spec);
  }
  return { sent, errors };
}
