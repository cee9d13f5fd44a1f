// Validates Prometheus Operator objects (PodMonitor, ServiceMonitor, PrometheusRule, ...) with the
// npm @kubernetes-models/prometheus-operator models (the operator's own CRD schemas).
//   node validate-prometheus-operator.js MODELS_DIR < objects.json   (a JSON array of objects)
// Prints one line per object; exit 1 when any is invalid. Used by tests/chart_render.rs.
const fs = require("fs");
const path = require("path");
const dir = process.argv[2];
const objects = JSON.parse(fs.readFileSync(0, "utf8"));
let failed = 0;
for (const obj of objects) {
  const [group, version] = obj.apiVersion.split("/");
  const name = `${obj.kind}/${obj.metadata && obj.metadata.name}`;
  try {
    const Model = require(path.join(dir, group, version, obj.kind + ".js"))[obj.kind];
    new Model(obj).validate();
    console.log(`valid ${name}`);
  } catch (e) {
    failed++;
    console.log(`INVALID ${name}: ${e.message}`);
  }
}
process.exit(failed ? 1 : 0);
