// Recompile custody/devchain/TestUSDC.sol into custody/devchain/TestUSDC.json (ABI + bytecode).
//
// Tests and the dev chain only read the JSON, so Node is needed only when the contract changes:
//
//   tmp=$(mktemp -d)
//   (cd "$tmp" && npm install --no-save solc@0.8.30 @openzeppelin/contracts@5.4.0)
//   node scripts/compile-test-usdc.cjs "$tmp/node_modules"
//   rm -rf "$tmp"
//
// Keep node_modules out of the repository. The output is deterministic for the same versions.
"use strict";

const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

const SOLC_VERSION = "0.8.30";
const OPENZEPPELIN_VERSION = "5.4.0";
const EVM_VERSION = "cancun";

const modules = process.argv[2];
if (!modules) {
  console.error("usage: node scripts/compile-test-usdc.cjs <node_modules with solc and @openzeppelin/contracts>");
  process.exit(2);
}
const requireFrom = createRequire(path.join(path.resolve(modules), "noop.js"));
const solc = requireFrom("solc");
const ozPackage = requireFrom("@openzeppelin/contracts/package.json");
if (!solc.version().startsWith(SOLC_VERSION + "+")) {
  throw new Error(`solc ${SOLC_VERSION} expected, found ${solc.version()}`);
}
if (ozPackage.version !== OPENZEPPELIN_VERSION) {
  throw new Error(`@openzeppelin/contracts ${OPENZEPPELIN_VERSION} expected, found ${ozPackage.version}`);
}

const packageDir = path.join(__dirname, "..", "custody", "devchain");
const sourceName = "TestUSDC.sol";
const input = {
  language: "Solidity",
  sources: { [sourceName]: { content: fs.readFileSync(path.join(packageDir, sourceName), "utf8") } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: EVM_VERSION,
    metadata: { bytecodeHash: "none" },
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
  },
};

function findImports(importPath) {
  try {
    return { contents: fs.readFileSync(requireFrom.resolve(importPath), "utf8") };
  } catch (error) {
    return { error: `cannot import ${importPath}: ${error.message}` };
  }
}

const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
const errors = (output.errors || []).filter((entry) => entry.severity === "error");
for (const entry of output.errors || []) console.error(entry.formattedMessage);
if (errors.length) process.exit(1);

const contract = output.contracts[sourceName].TestUSDC;
const artifact = {
  contractName: "TestUSDC",
  compiler: { solc: solc.version(), openzeppelin: OPENZEPPELIN_VERSION, evmVersion: EVM_VERSION, optimizerRuns: 200 },
  abi: contract.abi,
  bytecode: "0x" + contract.evm.bytecode.object,
};
const target = path.join(packageDir, "TestUSDC.json");
fs.writeFileSync(target, JSON.stringify(artifact, null, 1) + "\n");
console.log(`wrote ${path.relative(process.cwd(), target)} (${contract.evm.bytecode.object.length / 2} bytes of init code)`);
