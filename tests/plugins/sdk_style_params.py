# A plugin written for the Synapse SDK: `setup_inference_params` returns the SDK's request shape and
# the hooks use `self.context` (its logger, params and client), as SDK plugins do.
from totask_ray import ToTask as ToTaskAction


class ToTask(ToTaskAction):
    action_name = "to_task"

    def setup_inference_params(
        self,
        primary_file_url,
        primary_file_name,
        data_files,
        *,
        model_id,
        pre_processor_params,
        pre_processor_config,
        task_data,
    ):
        self.context.logger.info("task %s: asking for faces", task_data["id"])
        return {
            "model": model_id,
            "method": "post",
            "json": {"image_path": primary_file_url, "threshold": 0.5},
        }

    def convert_data_from_inference(self, inference_data, task_data=None):
        project = self.context.client.get_project(self.context.params["project"])
        for obj in inference_data["objects"]:
            obj["properties"]["project_title"] = project.title
        return inference_data
