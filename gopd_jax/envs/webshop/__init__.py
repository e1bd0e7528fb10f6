"""WebShop (Yao et al. 2022) as a light text environment: data and goals (`data`), BM25 search
(`search`), pages and text observations (`pages`), the purchase reward (`reward`), the session and its
oracle expert (`env`). See each module's docstring for what follows upstream and where it differs."""
from gopd_jax.envs.webshop.env import WebShopEnv, list_webshop_tasks, oracle_actions

__all__ = ["WebShopEnv", "list_webshop_tasks", "oracle_actions"]
