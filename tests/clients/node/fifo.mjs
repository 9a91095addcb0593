// FIFO order per message group with the official Node.js client (issue #4).
//
// usage: node fifo.mjs --mode consume --endpoint H:P --topic T --group G --name NAME
//          --events FILE --stop-file F [--invisible-ms MS] [--batch N] [--work-ms MS]
//          [--retry-group MG --retry-seq N] [--cid-ms MS]
//        node fifo.mjs --mode no-group --endpoint H:P --topic T
//
// consume   a SimpleConsumer that records, for every delivery, message group, sequence
//           (user property "seq"), delivery attempt, wall-clock receive time (after receive()
//           resolved) and ack time (just before ack() was called, and when it resolved), as
//           one JSON line per delivery in --events and in the final JSON document; the same
//           format as python/fifo.py consume, which verifies them. The first delivery of the
//           message (--retry-group, --retry-seq) is not acked: with --cid-ms its invisible
//           time is shortened with ChangeInvisibleDuration, otherwise it runs out. Stops when
//           --stop-file exists.
// no-group  sends a message without message group to the FIFO topic: it must be refused.
import { appendFileSync, existsSync } from 'node:fs';
import * as t from './common.mjs';

const opts = t.parseOptions({
  mode: { type: 'string', default: 'consume' },
  name: { type: 'string', default: 'node' },
  events: { type: 'string' },
  'stop-file': { type: 'string' },
  'invisible-ms': { type: 'string', default: '8000' },
  'await-duration': { type: 'string', default: '3' },
  batch: { type: 'string', default: '2' },
  'work-ms': { type: 'string', default: '30' },
  'retry-group': { type: 'string' },
  'retry-seq': { type: 'string' },
  'cid-ms': { type: 'string' },
  wait: { type: 'string', default: '90' },
}, [ 'endpoint', 'topic' ]);
t.startWatchdog(Number(opts.timeout), `fifo ${opts.mode}`);

const errors = [];
const out = { client: t.LANG, topic: opts.topic, mode: opts.mode };

async function consume() {
  if (!opts.group || !opts.events || !opts['stop-file']) {
    throw new Error('consume needs --group, --events and --stop-file');
  }
  const invisible = Number(opts['invisible-ms']);
  const retrySeq = opts['retry-seq'] === undefined ? null : Number(opts['retry-seq']);
  const workMs = Number(opts['work-ms']);
  const deliveries = [];
  out.name = opts.name;
  out.deliveries = deliveries;
  const consumer = new t.rmq.SimpleConsumer({
    ...t.clientOptions(opts),
    consumerGroup: opts.group,
    subscriptions: new Map([[ opts.topic, '*' ]]),
    awaitDuration: Number(opts['await-duration']) * 1000,
  });
  try {
    await t.withTimeout(consumer.startup(), 30000, 'simple consumer startup');
    appendFileSync(opts.events, JSON.stringify({ event: 'ready', consumer: opts.name, lang: t.LANG }) + '\n');
    t.log(`${opts.name}: consuming ${opts.topic} as ${opts.group}`);
    const deadline = Date.now() + Number(opts.wait) * 1000;
    while (!existsSync(opts['stop-file']) && Date.now() < deadline) {
      let msgs;
      try {
        msgs = await consumer.receive(Number(opts.batch), invisible);
      } catch (e) {
        t.log(`receive failed: ${e && e.message}; retrying in 1s`);
        await t.sleep(1000);
        continue;
      }
      const recv = Date.now();
      for (const mv of msgs || []) {
        const props = Object.fromEntries(mv.properties || new Map());
        const d = {
          consumer: opts.name, lang: t.LANG,
          message_id: mv.messageId, message_group: mv.messageGroup ?? null,
          seq: /^\d+$/.test(props.seq || '') ? Number(props.seq) : null,
          attempt: mv.deliveryAttempt, recv_ms: recv,
          ack_ms: null, ack_done_ms: null, acked: false, held: null,
        };
        if (d.message_group === opts['retry-group'] && d.seq === retrySeq && d.attempt === 1) {
          // The forced retry: not acked on its first delivery.
          if (opts['cid-ms'] !== undefined) {
            d.cid_ms = Date.now();
            try {
              await consumer.changeInvisibleDuration(mv, Number(opts['cid-ms']));
              d.held = `cid:${Number(opts['cid-ms'])}`;
            } catch (e) {
              d.held = `expire:${invisible}`;
              d.cid_error = String(e && e.message);
              errors.push(`ChangeInvisibleDuration of ${d.message_id} failed: ${e && e.message}`);
            }
          } else {
            d.held = `expire:${invisible}`;
          }
          t.log(`${opts.name}: holding ${d.message_group}#${d.seq} (attempt 1) unacked: ${d.held}`);
        } else {
          if (workMs) await t.sleep(workMs);
          d.ack_ms = Date.now();
          try {
            await consumer.ack(mv);
            d.acked = true;
          } catch (e) {
            d.ack_error = String(e && e.message);
          }
          d.ack_done_ms = Date.now();
        }
        deliveries.push(d);
        appendFileSync(opts.events, JSON.stringify({ ...d, event: 'delivery' }) + '\n');
      }
    }
  } finally {
    await t.safeShutdown(consumer, 'simple consumer');
  }
  t.log(`${opts.name}: ${deliveries.length} deliveries, ${deliveries.filter(d => d.acked).length} acked`);
}

// The Node.js client checks the message type against the route's acceptMessageTypes (when
// the server's settings ask for it) and refuses before sending; a server would answer
// MESSAGE_PROPERTY_CONFLICT_WITH_TYPE (40014).
async function noGroup() {
  const producer = new t.rmq.Producer({ ...t.clientOptions(opts), topics: [ opts.topic ] });
  try {
    await t.withTimeout(producer.startup(), 30000, 'producer startup');
    try {
      const receipt = await producer.send({ topic: opts.topic, body: Buffer.from('fifo message without a message group'), tag: 'fifo' });
      errors.push(`send without message group to a FIFO topic succeeded: ${receipt.messageId}`);
    } catch (e) {
      const text = `${e && e.name}: ${e && e.message}`;
      out.error = text;
      out.code_visible = /40014|CONFLICT_WITH_TYPE/.test(text);
      out.refused_by = out.code_visible ? 'server' : 'client';
      t.log(`refused as expected (${out.refused_by}): ${text}`);
      if (!out.code_visible && !/not match|acceptMessageTypes/i.test(text)) errors.push(`refused for an unexpected reason: ${text}`);
    }
  } finally {
    await t.safeShutdown(producer, 'producer');
  }
}

try {
  if (opts.mode === 'consume') await consume();
  else if (opts.mode === 'no-group') await noGroup();
  else throw new Error(`unknown --mode ${opts.mode} (consume | no-group)`);
} catch (e) {
  errors.push(`client error: ${e && (e.stack || e.message)}`);
}
for (const e of errors) t.log('FAIL: ' + e);
out.ok = errors.length === 0;
out.errors = errors;
t.emit(out);
t.finish(errors.length === 0 ? 0 : 1);
