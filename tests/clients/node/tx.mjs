// Transactional messages with the official Node.js Producer (checker + beginTransaction).
//
// Sends five transactional messages: A committed, B rolled back, C, D and E never ended.
// The checker answers COMMIT for C, ROLLBACK for D and "unknown" (no answer) for E. Waits
// until the server checked C and D once and E at least twice, checking what the server
// sent. Prints the send manifest of what must be delivered (A and C) plus "never": the
// ids that must never be delivered (B, D, E).
//
// usage: node tx.mjs --endpoint 127.0.0.1:PORT --topic T [--check-wait S]
import * as t from './common.mjs';

// apache.rocketmq.v2.TransactionResolution
const COMMIT = 1;
const ROLLBACK = 2;
const UNKNOWN = 0;

const opts = t.parseOptions({
  'check-wait': { type: 'string', default: '45' },
}, [ 'endpoint', 'topic' ]);
t.startWatchdog(Number(opts.timeout), 'tx');

const runId = t.newRunId();
const answers = new Map();
const bodies = new Map();
const calls = new Map();
const errors = [];
const checker = {
  async check(mv) {
    const id = mv.messageId;
    calls.set(id, (calls.get(id) || 0) + 1);
    if (!answers.has(id)) {
      errors.push(`checked unknown message id ${id}`);
      return ROLLBACK;
    }
    if (mv.topic !== opts.topic) errors.push(`${id}: check carries topic ${mv.topic}`);
    const body = Buffer.from(mv.body).toString('utf8');
    if (bodies.has(id) && body !== bodies.get(id)) errors.push(`${id}: check carries body ${JSON.stringify(body.slice(0, 60))}`);
    t.log(`checked ${id} (call ${calls.get(id)}): answering ${answers.get(id)}`);
    return answers.get(id);
  },
};

async function waitUntil(pred, seconds) {
  const deadline = Date.now() + seconds * 1000;
  while (Date.now() < deadline) {
    if (pred()) return true;
    await t.sleep(200);
  }
  return pred();
}

let producer;
let out = { messages: [], never: [], checks: {} };
try {
  producer = new t.rmq.Producer({ ...t.clientOptions(opts), topics: [ opts.topic ], checker });
  await t.withTimeout(producer.startup(), 30000, 'producer startup');
  const specs = {};
  const txs = {};
  [ 'A', 'B', 'C', 'D', 'E' ].forEach((name, i) => { specs[name] = t.messageSpec(runId, i, `Tx${name}`); });
  for (const [ name, spec ] of Object.entries(specs)) {
    const tx = producer.beginTransaction();
    const receipt = await producer.send(t.toMessageOptions(opts.topic, spec), tx);
    if (!receipt.transactionId) errors.push(`${name}: send receipt carries no transaction id`);
    spec.message_id = receipt.messageId;
    bodies.set(spec.message_id, spec.body);
    txs[name] = tx;
  }
  const ids = Object.fromEntries(Object.entries(specs).map(([ n, s ]) => [ n, s.message_id ]));
  answers.set(ids.C, COMMIT);
  answers.set(ids.D, ROLLBACK);
  answers.set(ids.E, UNKNOWN);
  await txs.A.commit();
  await txs.B.rollback();
  t.log('A committed, B rolled back; C, D, E left to the server\'s checks');
  const count = id => calls.get(id) || 0;
  const ok = await waitUntil(() => count(ids.C) >= 1 && count(ids.D) >= 1 && count(ids.E) >= 2,
    Number(opts['check-wait']));
  if (!ok) {
    errors.push(`server checks within ${opts['check-wait']}s: C=${count(ids.C)} D=${count(ids.D)} E=${count(ids.E)} (want C>=1, D>=1, E>=2)`);
  }
  for (const n of [ 'A', 'B' ]) {
    if (count(ids[n])) errors.push(`${n} (${ids[n]}) was checked although it was ended`);
  }
  // Let the answers (EndTransaction calls made after the checker returned) complete.
  await t.sleep(2000);
  out = {
    messages: [ specs.A, specs.C ],
    never: [ ids.B, ids.D, ids.E ],
    checks: Object.fromEntries(Object.values(ids).map(id => [ id, count(id) ])),
  };
} catch (e) {
  errors.push(`client error: ${e && (e.stack || e.message)}`);
}
await t.safeShutdown(producer, 'producer');
for (const e of errors) t.log('FAIL: ' + e);
t.emit({ client: t.LANG, ok: errors.length === 0, topic: opts.topic, run_id: runId, ...out, errors });
t.finish(errors.length === 0 ? 0 : 1);
