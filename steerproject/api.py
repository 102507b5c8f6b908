from ninja import NinjaAPI

api = NinjaAPI(title="SteerLab API", version="1.0", urls_namespace="api")
api.add_router("/", "steering_app.api.router")
api.add_router("/presets/steering", "presets_app.api.router")
