// Send N normal messages (tag, keys, user properties) with the official
// Node.js Producer and print the send manifest (JSON) on stdout.
// usage: node send_only.mjs --endpoint 127.0.0.1:PORT --topic T [--count N] [--tag TAG]
import * as t from './common.mjs';

const opts = t.parseOptions({
  count: { type: 'string', default: '10' },
  tag: { type: 'string', default: 'TagA' },
  'run-id': { type: 'string' },
}, [ 'endpoint', 'topic' ]);
t.startWatchdog(Number(opts.timeout), 'send_only');

const runId = opts['run-id'] || t.newRunId();
let producer;
let result = { sent: [], errors: [] };
try {
  producer = new t.rmq.Producer({ ...t.clientOptions(opts), topics: [ opts.topic ] });
  // startup() waits for the server's Telemetry settings reply without a timeout.
  await t.withTimeout(producer.startup(), 30000, 'producer startup (QueryRoute + Telemetry settings)');
  result = await t.sendMessages(producer, opts.topic, Number(opts.count), opts.tag, runId);
} catch (e) {
  result.errors.push(`client error: ${e && (e.stack || e.message)}`);
}
await t.safeShutdown(producer, 'producer');
for (const e of result.errors) t.log('FAIL: ' + e);
t.log(`sent ${result.sent.length} message(s) to ${opts.topic}`);
t.emit({ client: t.LANG, ok: result.errors.length === 0, topic: opts.topic, run_id: runId,
  messages: result.sent, errors: result.errors });
t.finish(result.errors.length === 0 ? 0 : 1);
