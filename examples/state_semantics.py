"""State semantics: pooled agents keep their state, and three ways to isolate requests.

Run it (in-process pools, no broker or worker needed):

    python examples/state_semantics.py

Pooled agents are long-lived: whatever one request leaves in an agent's state, the next
request on that agent sees. That is what makes a counter count, and what leaks one
customer's cart into the next customer's. The three isolation patterns:

1. stateless agents: the request travels in the signal; state holds only resources;
2. a reset signal at the start of each transaction;
3. ``reset_on_checkin=True``: the pool resets each agent when it comes back.

The same holds in a Celery worker (``warm.call``/``warm.transaction``); see counter.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file too

from types import MappingProxyType
from typing import Any, ClassVar

from pydantic import BaseModel

from celery_warmpool import (
    Action,
    ActionContext,
    Agent,
    AgentPool,
    AgentState,
    Signal,
    resource,
)

SOURCE = "/examples/state_semantics"


def signal(type: str, **data: Any) -> Signal:
    return Signal.new(type, data, source=SOURCE)


# -- a counter ---------------------------------------------------------------------------


class CounterState(BaseModel):
    count: int = 0


class Increment(Action):
    name = "increment"

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {"count": context.state.count + 1}


class CounterAgent(Agent[CounterState]):
    signal_routes = {"counter.increment": Increment}


# -- a shop: a price list (a resource) and a cart (request data) -----------------------


class ShopState(AgentState):
    prices: Any = resource()  # loaded once in setup(); kept across reset()
    cart: list[str] = []
    last_total: float | None = None


class AddToCart(Action):
    """Stateful: the cart lives in the agent between signals."""

    name = "add"

    class Params(BaseModel):
        item: str

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {"cart": [*context.state.cart, params.item]}


class Total(Action):
    """Price the cart held in the agent's state."""

    name = "total"

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        prices = context.state.prices
        return {"last_total": sum(prices[item] for item in context.state.cart)}


class Quote(Action):
    """Stateless: the items come in the signal; only the price list is read from state."""

    name = "quote"

    class Params(BaseModel):
        items: list[str]

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        prices = context.state.prices
        return {"last_total": sum(prices[item] for item in params.items)}


class ResetCart(Action):
    """Empty the request data; the price list is a resource and stays."""

    name = "reset"

    def run(self, params: Any, context: ActionContext) -> dict[str, Any]:
        return {"cart": [], "last_total": None}


class ShopAgent(Agent[ShopState]):
    signal_routes = {"cart.add": AddToCart, "cart.total": Total, "cart.quote": Quote,
                     "cart.reset": ResetCart}
    #: How many times any shop agent loaded its price list (in this process).
    loads: ClassVar[int] = 0

    def setup(self) -> None:
        # Stands for something expensive to load: it is loaded once per agent.
        self.state.prices = MappingProxyType({"apple": 2.0, "pear": 1.5, "plum": 0.75})
        ShopAgent.loads += 1


def buy(pool: AgentPool[ShopAgent], items: list[str], *, reset_first: bool = False) -> float:
    """One customer's request: put ``items`` in the cart and price it, on one agent."""
    signals = [signal("cart.add", item=item) for item in items] + [signal("cart.total")]
    if reset_first:
        signals.insert(0, signal("cart.reset"))
    total: float = pool.transaction(signals)[-1].state["last_total"]
    return total


def main() -> int:
    print("state persists across checkouts (a counter, pool of size 1):")
    with AgentPool(CounterAgent, name="counter", size=1) as counters:
        first = counters.call(signal("counter.increment"))
        second = counters.call(signal("counter.increment"))
        print(f"  count {first.state['count']} then {second.state['count']} "
              f"(same agent: {first.agent_id == second.agent_id})")

    print("the leak: a stateful cart on a pooled agent (size 1)")
    with AgentPool(ShopAgent, name="shop", size=1) as shop:
        alice = buy(shop, ["apple", "pear"])
        bob = buy(shop, ["pear"])
        print(f"  alice buys apple+pear: {alice:.2f}; bob buys pear: {bob:.2f} "
              "(bob pays for alice's cart too)")

    print("pattern 1, stateless agent: the items travel in the signal")
    with AgentPool(ShopAgent, name="shop_stateless", size=1) as shop:
        alice_reply = shop.call(signal("cart.quote", items=["apple", "pear"]))
        bob_reply = shop.call(signal("cart.quote", items=["pear"]))
        print(f"  alice: {alice_reply.state['last_total']:.2f}; "
              f"bob: {bob_reply.state['last_total']:.2f}; "
              f"resource in the reply: {'prices' in bob_reply.state}")

    print("pattern 2, a reset signal at the start of each transaction")
    with AgentPool(ShopAgent, name="shop_reset", size=1) as shop:
        alice = buy(shop, ["apple", "pear"], reset_first=True)
        bob = buy(shop, ["pear"], reset_first=True)
        print(f"  alice: {alice:.2f}; bob: {bob:.2f}")

    print("pattern 3, reset_on_checkin=True: the pool resets each agent it gets back")
    loads_before = ShopAgent.loads
    with AgentPool(ShopAgent, name="shop_isolated", size=1, reset_on_checkin=True) as shop:
        alice = buy(shop, ["apple", "pear"])
        bob = buy(shop, ["pear"])
        with shop.agent() as agent:
            cart, kept = agent.state.cart, agent.state.prices is not None
        loads = ShopAgent.loads - loads_before
        print(f"  alice: {alice:.2f}; bob: {bob:.2f}; cart between requests: {cart}")
        print(f"  the price list (a resource) survives the resets: {kept}, "
              f"loaded {loads} time for 3 checkouts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
