// A plain Node.js client of the Open Inference Protocol, as an application developer would write
// one: @grpc/grpc-js with the .proto files loaded at run time. Prints one JSON object for the test.
//   node client.js HOST:PORT
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto", "grpc_service.proto");
const definition = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, defaults: true });
const inference = grpc.loadPackageDefinition(definition).inference;

function call(client, method, request) {
  return new Promise((resolve) => {
    client[method](request, (error, response) => resolve(error ? { code: error.code, details: error.details } : response));
  });
}

function float32Raw(values) {
  const buffer = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => buffer.writeFloatLE(v, i * 4));
  return buffer;
}

function decodeRaw(tensor, raw) {
  const n = raw.length;
  switch (tensor.datatype) {
    case "FP32": return Array.from({ length: n / 4 }, (_, i) => raw.readFloatLE(i * 4));
    case "INT64": return Array.from({ length: n / 8 }, (_, i) => Number(raw.readBigInt64LE(i * 8)));
    default: throw new Error(`unexpected datatype ${tensor.datatype}`);
  }
}

function outputs(response) {
  const out = {};
  response.outputs.forEach((t, i) => { out[t.name] = { shape: t.shape, datatype: t.datatype, values: decodeRaw(t, response.raw_output_contents[i]) }; });
  return out;
}

async function main() {
  const client = new inference.GRPCInferenceService(process.argv[2], grpc.credentials.createInsecure());
  const result = {};
  result.live = (await call(client, "ServerLive", {})).live;
  result.server = await call(client, "ServerMetadata", {});
  result.metadata = await call(client, "ModelMetadata", { name: "iris", version: "" });

  const iris = [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3];
  const raw = await call(client, "ModelInfer", {
    model_name: "iris", model_version: "1", id: "node-1",
    inputs: [{ name: "input", datatype: "FP32", shape: [2, 4] }],
    raw_input_contents: [float32Raw(iris)],
  });
  result.iris = { id: raw.id, version: raw.model_version, outputs: outputs(raw) };

  const typed = await call(client, "ModelInfer", {
    model_name: "petal_width",
    inputs: [
      { name: "species", datatype: "BYTES", shape: [2, 1], contents: { bytes_contents: [Buffer.from("setosa"), Buffer.from("virginica")] } },
      { name: "sepal_length", datatype: "FP32", shape: [2, 1], contents: { fp32_contents: [5.1, 6.7] } },
      { name: "sepal_width", datatype: "FP32", shape: [2, 1], contents: { fp32_contents: [3.5, 3.0] } },
      { name: "petal_length", datatype: "FP32", shape: [2, 1], contents: { fp32_contents: [1.4, 5.2] } },
    ],
  });
  result.petal_width = { generated_id: typed.id, outputs: outputs(typed) };
  result.not_found = await call(client, "ModelInfer", { model_name: "no_such_model" });
  client.close();
  process.stdout.write(JSON.stringify(result));
}

main().catch((e) => { console.error(e); process.exit(1); });
