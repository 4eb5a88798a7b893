"""The platform's endpoints, one module per resource group; `app.create_app` routes to them.

Handlers are module-level functions that find their platform with `state.platform_of(request)`,
so nothing is captured in closures and each can be read (and called) on its own.
"""
