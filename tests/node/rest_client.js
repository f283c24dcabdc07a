// A plain Node.js client of the Open Inference Protocol's REST binding, as an application developer
// would write one: the global fetch (Node 18+), JSON in and out, no npm packages. Prints one JSON
// object for the test.
//   node rest_client.js HOST:PORT
"use strict";

async function get(base, path) {
  const response = await fetch(base + path);
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

async function main() {
  const base = `http://${process.argv[2]}`;
  const result = {};
  result.ready = (await get(base, "/v2/health/ready")).status;
  result.metadata = (await get(base, "/v2/models/iris")).body;

  const request = {
    id: "node-rest-1",
    inputs: [{ name: "input", shape: [2, 4], datatype: "FP32", data: [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3] }],
  };
  const response = await fetch(`${base}/v2/models/iris/infer`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(request),
  });
  result.infer = { status: response.status, content_type: response.headers.get("content-type"), body: await response.json() };
  result.not_found = (await get(base, "/v2/models/no_such_model")).status;
  process.stdout.write(JSON.stringify(result));
}

main().catch((e) => { console.error(e); process.exit(1); });
