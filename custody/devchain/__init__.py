"""A local development chain for tests, demos and examples (needs the ``devchain`` extra).

    from custody.devchain import start_chain

    chain = start_chain()                       # in-process eth-tester, prefunded accounts, auto-mining
    usdc = chain.deploy_test_usdc()             # USDC-like: 6 decimals, EIP-3009, domain "USD Coin" / "2"
    usdc.mint(address, 5_000_000)               # 5 tokens
    url = chain.serve_rpc()                     # http://127.0.0.1:<port> for clients that need a URL
    chain.close()

``TestUSDC.sol`` is the token's source and ``TestUSDC.json`` its compiled artifact (ABI and
bytecode); ``scripts/compile-test-usdc.cjs`` says how to rebuild it with the npm ``solc`` package.
"""

from custody.devchain.chain import DevChain, TestToken, start_chain, token_artifact

__all__ = ["DevChain", "TestToken", "start_chain", "token_artifact"]
